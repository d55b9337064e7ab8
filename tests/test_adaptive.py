"""Adaptive load balancing: from a poor partition (even blocks, the heavy item head on the
last stage) the trainer re-partitions at the first check, the re-measured stage times are
within 10% of each other (max / mean <= 1.10), and the losses equal a run that never
re-balanced (rtol 1e-5: only the partition differs, which the pipeline tests show exact).
"""

import numpy as np

from rec_llm.train import trainer
from tests.helpers import tiny_config


def _config(adaptive):
  c = tiny_config(data=4, tensor=1, pipe=2)
  # 12 blocks, and an item head costing a few blocks: the even split (6, 6) is slow.
  c.model.update(num_layers=12, d_model=32, num_heads=2, mlp_dim=64, max_len=16)
  c.data.num_items = 6000
  c.train.update(steps=4, batch_size=16, log_every=1)
  c.pipeline.update(schedule="1f1b", microbatches=2, stage_layers=())
  c.balance.update(adaptive=adaptive, every_steps=2, fixed_cost_s=0.0, repeats=7)
  del c["eval"]
  return c


def test_rebalances_and_keeps_the_losses():
  fixed = trainer.train(_config(False))
  adapted = trainer.train(_config(True))
  decisions = [r for r in adapted if "balance" in r]
  assert len(decisions) == 1 and decisions[0]["step"] == 2
  d = decisions[0]
  assert d["balance"]["rebalance"], d["balance"]["reason"]
  assert d["balance"]["current"] == [6, 6] and d["balance"]["proposed"][0] > 6
  assert d["balance/imbalance_before"] > 1.10
  assert d["balance/imbalance_after"] <= 1.10, d
  loss = lambda h: np.array([r["loss"] for r in h if "loss" in r])
  np.testing.assert_allclose(loss(adapted), loss(fixed), rtol=1e-5)
