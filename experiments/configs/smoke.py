"""A tiny model for a fast end-to-end check (tests use it).

  python -m experiments.train --config=experiments/configs/smoke.py --workdir=/tmp/rec_llm/smoke

Expected: 60 steps in well under a minute on 8 virtual CPU devices; the loss falls by more
than 30% (from ~6.2 to ~3.5) and train HR@10 climbs from ~0 to ~0.5.
"""

from experiments.configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.model.update(num_layers=2, d_model=32, num_heads=4, mlp_dim=64, max_len=16)
  c.data.num_items = 500
  c.train.update(steps=60, batch_size=32, learning_rate=1e-2, warmup_steps=5, log_every=10)
  c.data.eval_users = 128
  c.eval.update(every_steps=0, batch_size=64)  # 0: only at the end
  c.checkpoint.every_steps = 20
  return c
