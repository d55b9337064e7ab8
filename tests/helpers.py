"""Small shared pieces for the tests."""

import os
import subprocess
import sys

import ml_collections
import numpy as np

from tests import numerics
from tests.conftest import ROOT


def tiny_config(**mesh) -> ml_collections.ConfigDict:
  """A model small enough to compile in seconds that still splits over up to 8 tensor shards."""
  from experiments.configs import smoke
  c = smoke.get_config()
  c.mesh.update(data=1, tensor=1, pipe=1)
  c.mesh.update(mesh)
  c.model.update(num_layers=2, d_model=64, num_heads=8, mlp_dim=128, max_len=12)
  c.data.num_items = 300
  c.train.update(batch_size=16, steps=10, warmup_steps=2, learning_rate=1e-2)
  return c


def run_trainer(args, timeout=120, env=None, launcher=None):
  """Runs the trainer CLI (or `launch/local.sh N`) in a subprocess; returns CompletedProcess."""
  full_env = dict(os.environ, PYTHON=sys.executable, **(env or {}))
  full_env.pop("XLA_FLAGS", None)  # let the trainer / launcher choose the device count
  cmd = ([sys.executable, "-m", "experiments.train"] if launcher is None
         else ["bash", os.path.join(ROOT, "launch", "local.sh"), str(launcher)])
  return subprocess.run(cmd + list(args), cwd=ROOT, env=full_env, capture_output=True,
                        text=True, timeout=timeout)


def step_losses(run, steps: int):
  """(losses of `steps` compiled steps from run.state on batches 0.., the final state)."""
  step, state, out = run.compile(), run.state, []
  for i in range(steps):
    state, m = step(state, run.batches(i))
    out.append(float(m["loss"]))
  return np.array(out), state


# Layouts (data, tensor, pipe, processes) change only the order of float32 sums. The
# longest reordered sum in these tiny models is the vocabulary softmax over 384 item rows
# (the gradients' sums over 192 positions are shorter): 8 sqrt(384) u = 9.3e-6 relative.
# Measured across the suite the largest error is about 0.13 of it (gradients in relative
# norm; losses about 0.01), on 1 to 8 devices and 2 processes.
LAYOUT_RTOL = numerics.reorder_rtol(384)
