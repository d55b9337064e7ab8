import json

import pytest
import os

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from experiments.configs import smoke
from rec_llm.train import trainer


def test_smoke_config_learns_and_writes_metrics(tmp_path):
  config = smoke.get_config()
  assert config.train.steps >= 50
  history = trainer.train(config, str(tmp_path))
  lines = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert lines == history
  train = [r for r in lines if "loss" in r]
  for key in ("step", "loss", "step_time_s", "tokens_per_s", "mfu", "time_s"):
    assert all(key in rec for rec in train), key
  assert train[0]["step"] == 1 and train[-1]["step"] == config.train.steps
  first, last = train[0]["loss"], train[-1]["loss"]
  assert last <= 0.7 * first, f"loss fell only from {first:.3f} to {last:.3f}"
  assert train[-1]["hr@10"] > train[0]["hr@10"] + 0.2
  assert all(0 < rec["mfu"] < 1 and rec["tokens_per_s"] > 0 for rec in train)
  # Held-out ranking at the end, both splits, with time-to-quality beside it.
  evals = {k: v for r in lines if "loss" not in r for k, v in r.items()}
  for split in ("eval", "test"):
    for m in ("hr@10", "ndcg@10", "hr@50", "ndcg@50", "hr@200", "ndcg@200", "mrr"):
      assert 0 <= evals[f"{split}/{m}"] <= 1, (split, m)
  assert evals["test/hr@10"] > 0.2  # far above chance (10 / 500 items)
  assert evals["time_s"] > 0
  # The same scalars in TensorBoard.
  acc = EventAccumulator(os.path.join(tmp_path, "tensorboard"))
  acc.Reload()
  assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in train]
  assert acc.Scalars("test/ndcg@10")[-1].value == pytest.approx(evals["test/ndcg@10"])
