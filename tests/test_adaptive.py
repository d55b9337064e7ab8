"""Adaptive load balancing: from a poor partition (3 and 9 blocks, the heavy item head on the
last stage too) the trainer re-partitions at the first check, the stage times measured afterwards
are even (max / mean <= 1.10), and the losses equal a run that never re-balanced (`LAYOUT_RTOL`:
only the partition differs, which changes the order of float32 sums at most).

Stage times are wall-clock on a shared CPU: each is the fastest of `balance.repeats` runs,
with all stages and partitions timed in turn, so load from elsewhere must hit every run of
one stage to skew it. They are timed in the code users run: the runs go in a subprocess
at XLA's default optimisation level, not the -O0 the other tests compile with for speed
(which also changes what a block costs inside a stage's loop).
"""

import json
import subprocess
import sys

import numpy as np

from tests import numerics
from tests.conftest import ROOT
from tests.helpers import LAYOUT_RTOL, subprocess_env, tiny_config

_DRIVER = """
import json, sys
import tests.conftest
from rec_llm.train import trainer
from tests.test_adaptive import _config
print(json.dumps([trainer.train(_config(b)) for b in (False, True)]))
"""


def _config(balance):
  c = tiny_config(data=4, tensor=1, pipe=2)
  # 12 blocks and an item head costing many of them: (3, 9) is slow. (From the even split
  # the simulated gain of GPipe's best move is only ~3%: each tick's fixed cost dominates
  # these tiny ops, and on a machine busy with other tests that is within noise. From
  # (3, 9) it is ~15%, so the decision does not hinge on the noise.)
  c.model.update(num_layers=12, d_model=64, num_heads=2, mlp_dim=256, max_len=32)
  # The head must stay lighter than most of the blocks, or no split gets within 1.10: with
  # 20,000 items it cost 10-14 blocks on this machine on a slow day, the best split (11, 1)
  # left 1.13 and the test failed on noise-free grounds.
  c.data.num_items = 10000
  c.train.update(steps=4, batch_size=64, log_every=1)
  # GPipe: a forward phase then a backward phase (the head in the last stage's backward
  # ticks), each as slow as its slowest stage. (1F1B's lock-step ticks pair one stage's
  # forward with another's backward: there an even split gains little, and the balancer,
  # simulating the schedule's ticks, would not move.) min_gain 0: move whenever the
  # simulated step is faster at all, so the test does not hinge on the size of the gain.
  c.pipeline.update(schedule="gpipe", microbatches=8, stage_layers=(3, 9))
  c.balance.update(adaptive=balance, every_steps=2, fixed_cost_s=0.0, min_gain=0.0, repeats=40)
  del c["eval"]
  return c


def test_rebalances_and_keeps_the_losses():
  p = subprocess.run([sys.executable, "-c", _DRIVER], cwd=ROOT, capture_output=True, text=True,
                     timeout=600, env=subprocess_env(
                         XLA_FLAGS="--xla_backend_optimization_level=2"))
  assert p.returncode == 0, p.stderr[-3000:]
  fixed, adapted = json.loads(p.stdout.strip().splitlines()[-1])
  decisions = [r for r in adapted if "balance" in r]
  assert [d["step"] for d in decisions] == [2]
  d = decisions[0]
  b = d["balance"]
  assert b["rebalance"], b["reason"]
  assert b["current"] == [3, 9] and b["proposed"][0] > 6  # blocks move off the head's stage
  after = d["balance/stage_s_after"]
  assert d["balance/imbalance_after"] <= 1.10, (after, b)
  assert d["balance/imbalance_after"] < d["balance/imbalance_before"], d
  loss = lambda h: np.array([r["loss"] for r in h if "loss" in r])
  numerics.check_close("losses", loss(adapted), loss(fixed), LAYOUT_RTOL * loss(fixed))
