import json
import os

from experiments.configs import smoke
from rec_llm.train import trainer


def test_smoke_config_learns_and_writes_metrics(tmp_path):
  config = smoke.get_config()
  assert config.train.steps >= 50
  history = trainer.train(config, str(tmp_path))
  lines = [json.loads(l) for l in open(os.path.join(tmp_path, "metrics.jsonl"))]
  assert lines == history
  for key in ("step", "loss", "step_time_s", "tokens_per_s", "mfu"):
    assert all(key in rec for rec in lines), key
  assert lines[0]["step"] == 1 and lines[-1]["step"] == config.train.steps
  first, last = lines[0]["loss"], lines[-1]["loss"]
  assert last <= 0.7 * first, f"loss fell only from {first:.3f} to {last:.3f}"
  assert lines[-1]["hr@10"] > lines[0]["hr@10"] + 0.2
  assert all(0 < rec["mfu"] < 1 and rec["tokens_per_s"] > 0 for rec in lines)
