"""A >1B-parameter recommender (2M-item table + 24 blocks of width 2048), for accelerators.

  python -m experiments.train --config=experiments/configs/large_1b.py --workdir=/tmp/rec_llm/1b \
      --config.mesh.data=-1 --config.mesh.tensor=8

About 1.2B parameters in the blocks and 4.1B in the item table (its rows sharded over
`tensor`). Too big to train on the CPU machine; the tests initialise it abstractly.
"""

from experiments.configs import default


def get_config(arg=None):
  c = default.get_config(arg)
  c.mesh.update(data=-1, tensor=8, pipe=1)
  c.model.update(num_layers=24, d_model=2048, num_heads=16, mlp_dim=8192, max_len=200,
                 dtype="bfloat16", remat=True)
  c.data.num_items = 2_000_000
  c.train.update(steps=1000, batch_size=256, learning_rate=3e-4, warmup_steps=100, log_every=10)
  return c
