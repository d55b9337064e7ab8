"""Small shared pieces for the tests."""

import json
import os
import subprocess
import sys

import ml_collections
import numpy as np

from tests import numerics
from tests.conftest import ROOT, SUBPROCESS_XLA_FLAGS


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


def subprocess_env(**extra) -> dict:
  """The environment for a trainer or launcher subprocess: the tests' XLA flags without
  the device count (the trainer / launcher choose it)."""
  return {**os.environ, "PYTHON": sys.executable, "XLA_FLAGS": SUBPROCESS_XLA_FLAGS, **extra}


def run_trainer(args, timeout=120, env=None, launcher=None):
  """Runs the trainer CLI (or `launch/local.sh N`) in a subprocess; returns CompletedProcess."""
  full_env = subprocess_env(**(env or {}))
  cmd = ([sys.executable, "-m", "experiments.train"] if launcher is None
         else ["bash", os.path.join(ROOT, "launch", "local.sh"), str(launcher)])
  return subprocess.run(cmd + list(args), cwd=ROOT, env=full_env, capture_output=True,
                        text=True, timeout=timeout)


def logged_losses(workdir) -> dict[int, float]:
  """step -> loss from WORKDIR/metrics.jsonl, the last record of each step winning (a
  resumed run logs again the steps after its checkpoint)."""
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec["loss"]
  return out


def one_error(p, needle: str, code: int = 2) -> str:
  """Asserts a command ended with exit `code` and exactly one `error:` line containing
  `needle`, and no traceback; returns that line."""
  assert p.returncode == code, (p.returncode, p.stderr[-3000:])
  assert "Traceback" not in p.stderr, p.stderr[-3000:]
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and needle in errors[0], p.stderr[-3000:]
  return errors[0]


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
# A model whose gradients are worse conditioned than the reordering bound assumes: HSTU's
# (its attention output is normalised per head; where a query's few weights nearly cancel,
# the norm divides by a small spread). Moving every parameter of the tiny 2-block model by an
# ulp moves its gradients 2.7e-5 in relative norm (the transformer's: 9.7e-7), the 8-block
# pipeline model's 2.3e-4; layouts moved them up to 2.2x that (5e-6 even for data=8 alone).
# Such tests measure that sensitivity at the reference and allow 8x it.
CONDITIONING_FACTOR = 8


def conditioned_rtol(sensitivity: float) -> float:
  """The gradients' tolerance across layouts given their measured ulp sensitivity."""
  return max(LAYOUT_RTOL, CONDITIONING_FACTOR * sensitivity)
