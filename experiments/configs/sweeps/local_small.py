r"""Measured on this machine: a handful of meshes of the default config, a few steps each,
next to the simulator's prediction for the same plans (the `this_machine` preset).

  python -m experiments.sweep --config=experiments/configs/sweeps/local_small.py --workdir=/tmp/local
  python -m experiments.paper_tables --results=/tmp/paper,/tmp/local --out=/tmp/tables.md

Expected: 18 points (9 measured, 9 simulated; --list prints them) in about 2 minutes on
the 2-core CPU machine with 8 virtual devices; each measured row has step time (median of
the logged steps after the first), tokens/s and MFU; predictions within about 25% of them
(experiments/results/paper_tables.md, table e). Virtual devices share the host's cores,
so the timings compare layouts on this machine, nothing more (README, 'MFU').
"""

import ml_collections


def get_config(arg=None):
  del arg
  c = ml_collections.ConfigDict()
  c.name = "local_small"
  c.defaults = dict(config="experiments/configs/default.py", sources=("measured", "simulated"),
                    clusters=("this_machine",), steps=12)
  c.groups = [
      dict(name="local_meshes", meshes=("8x1x1", "4x2x1", "2x4x1", "4x1x2", "2x2x2")),
      dict(name="local_dp", meshes=("4x2x1",), compressions=("int8", "topk"), dp_modes=("sync",)),
      dict(name="local_dp", meshes=("4x2x1",), dp_modes=("stale", "local_sgd"), staleness=2,
           local_steps=2),
  ]
  return c
