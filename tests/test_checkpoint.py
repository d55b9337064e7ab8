"""Checkpoints lose nothing: kill -9 and resume, another mesh, SIGTERM, non-finite steps."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import smoke
from rec_llm.errors import TrainingError
from rec_llm.train import checkpoint, trainer
from tests import numerics
from tests.conftest import ROOT
from tests.helpers import LAYOUT_RTOL, run_trainer

STEPS = 30
ARGS = ["--config=experiments/configs/smoke.py", f"--config.train.steps={STEPS}",
        "--config.train.log_every=1", "--config.checkpoint.every_steps=4"]


def _losses(workdir):
  """step -> loss, the last record of each step winning (a resumed run re-logs steps)."""
  out = {}
  for line in open(os.path.join(workdir, "metrics.jsonl")):
    rec = json.loads(line)
    if "loss" in rec:
      out[rec["step"]] = rec["loss"]
  return out


def _start(workdir):
  env = dict(os.environ, PYTHON=sys.executable)
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, "-m", "experiments.train", *ARGS, f"--workdir={workdir}"],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def _wait_for_step(proc, workdir, step, timeout=120):
  deadline = time.time() + timeout
  while True:
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path) and max(_losses(workdir), default=0) >= step:
      return
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    assert time.time() < deadline, "run did not reach the step"
    time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  p = run_trainer(ARGS + [f"--workdir={workdir}"], timeout=180)
  assert p.returncode == 0, p.stderr[-2000:]
  return _losses(workdir)


def _committed_steps(workdir):
  """Checkpoint steps orbax has finished (renamed from their temporary directory)."""
  d = os.path.join(workdir, "checkpoints")
  return [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
  kill_at = random.Random().randint(6, STEPS - 6)
  proc = _start(str(tmp_path))
  _wait_for_step(proc, str(tmp_path), kill_at)
  # Saves are asynchronous: on a loaded machine the first may still be in flight at the
  # kill step, and the run would rightly start over. Kill once one is committed.
  deadline = time.time() + 60
  while not _committed_steps(str(tmp_path)) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.05)
  assert _committed_steps(str(tmp_path)), "no checkpoint committed before the kill"
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  p = run_trainer(ARGS + [f"--workdir={tmp_path}"], timeout=180)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "resumed from" in p.stderr
  got = _losses(str(tmp_path))
  assert sorted(got) == sorted(uninterrupted) == list(range(1, STEPS + 1))
  # The same program on the same state and batches: bit for bit the same losses.
  assert got == uninterrupted, f"killed at {kill_at}"


def test_sigterm_saves_and_exits_cleanly(tmp_path, uninterrupted):
  proc = _start(str(tmp_path))
  _wait_for_step(proc, str(tmp_path), 6)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM: saved step" in err
  saved = checkpoint.Checkpointer(str(tmp_path)).latest_step()
  assert 6 <= saved < STEPS
  assert max(_losses(str(tmp_path))) == saved  # stopped right at the saved step
  p = run_trainer(ARGS + [f"--workdir={tmp_path}"], timeout=180)
  assert p.returncode == 0 and f"at step {saved}" in p.stderr
  assert _losses(str(tmp_path)) == uninterrupted  # bit for bit, as after kill -9


def _config(data, tensor, steps):
  c = smoke.get_config()
  c.mesh.update(data=data, tensor=tensor, pipe=1)
  c.model.num_heads = 4
  c.train.update(steps=steps, log_every=1)
  c.checkpoint.every_steps = 5
  c.eval.every_steps = 0
  return c


def test_restore_onto_other_meshes(tmp_path):
  """Saved on (4,2,1); continued on (2,4,1) and on 1 device: the same losses.

  The restored state is bit-identical; the continuation differs from the original only in
  reduction order across layouts, so the tolerance is the layout-equivalence one."""
  src = tmp_path / "src"
  trainer.train(_config(4, 2, 10), str(src))
  want = _losses(str(src))
  for name, (data, tensor, devices) in {"2x4": (2, 4, jax.devices()),
                                        "1dev": (1, 1, jax.devices()[:1])}.items():
    dst = tmp_path / name
    os.makedirs(dst / "checkpoints")
    shutil.copytree(src / "checkpoints" / "5", dst / "checkpoints" / "5")
    trainer.train(_config(data, tensor, 10), str(dst), devices=devices)
    got = _losses(str(dst))
    assert sorted(got) == list(range(6, 11)), name
    numerics.check_close(name, [got[s] for s in got], [want[s] for s in got],
                         LAYOUT_RTOL * np.abs([want[s] for s in got]))


def _all_finite(tree):
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(tree))


def test_nonfinite_step_is_skipped_and_never_checkpointed(tmp_path):
  c = _config(4, 2, 12)
  c.train.inject_nonfinite_steps = (6,)
  history = trainer.train(c, str(tmp_path))
  losses = {r["step"]: r["loss"] for r in history if "loss" in r}
  assert np.isnan(losses[7]) and all(np.isfinite(v) for s, v in losses.items() if s != 7)
  ck = checkpoint.Checkpointer(str(tmp_path))
  run = trainer.build(c, init=False)
  for step in ck.manager.all_steps():
    state, _ = ck.restore(run.abstract_state, step)
    assert _all_finite(state.params) and _all_finite(state.opt_state)
    assert int(state.skipped) == (1 if step >= 7 else 0)


def test_nonfinite_stop_mode_stops_before_checkpointing(tmp_path):
  c = _config(4, 2, 12)
  c.train.update(inject_nonfinite_steps=(6,), nonfinite="stop", log_every=100)
  with pytest.raises(TrainingError, match="non-finite loss or gradient.*train.nonfinite='stop'"):
    trainer.train(c, str(tmp_path))
  ck = checkpoint.Checkpointer(str(tmp_path))
  assert ck.manager.all_steps() == [5]  # the save at step 10 was refused
