"""Checkpoints lose nothing: kill -9 during a save and resume, another mesh, SIGTERM.

Non-finite steps and damaged checkpoints: tests/test_guard.py and tests/test_faults.py."""

import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from experiments.configs import smoke
from rec_llm.train import checkpoint, trainer
from tests import numerics
from tests.conftest import ROOT
from tests.helpers import LAYOUT_RTOL, logged_losses, run_trainer, subprocess_env

STEPS = 30
ARGS = ["--config=experiments/configs/smoke.py", f"--config.train.steps={STEPS}",
        "--config.train.log_every=1", "--config.checkpoint.every_steps=4"]


def _start(workdir):
  env = subprocess_env()
  return subprocess.Popen([sys.executable, "-m", "experiments.train", *ARGS, f"--workdir={workdir}"],
                          cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)


def _wait_for_step(proc, workdir, step, timeout=120):
  deadline = time.time() + timeout
  while True:
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path) and max(logged_losses(workdir), default=0) >= step:
      return
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    assert time.time() < deadline, "run did not reach the step"
    time.sleep(0.05)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("straight"))
  p = run_trainer(ARGS + [f"--workdir={workdir}"], timeout=180)
  assert p.returncode == 0, p.stderr[-2000:]
  return logged_losses(workdir)


def _committed_steps(workdir):
  """Checkpoint steps orbax has finished (renamed from their temporary directory)."""
  d = os.path.join(workdir, "checkpoints")
  return [int(n) for n in os.listdir(d) if n.isdigit()] if os.path.isdir(d) else []


def _in_flight(workdir):
  """Temporary directories of asynchronous saves not yet committed."""
  d = os.path.join(workdir, "checkpoints")
  return [n for n in os.listdir(d) if "tmp" in n] if os.path.isdir(d) else []


def test_kill_9_during_an_async_save_then_resume(tmp_path, uninterrupted):
  """Killed while a save is being written: the partial save never counts as a checkpoint
  (orbax renames a step's directory only when complete); the resumed run starts from the
  last committed step, removes the leftover, and continues with the same losses."""
  proc = _start(str(tmp_path))
  deadline = time.time() + 120
  while not _committed_steps(str(tmp_path)):  # one committed first, to resume from
    assert proc.poll() is None and time.time() < deadline, "no checkpoint committed"
    time.sleep(0.01)
  while not _in_flight(str(tmp_path)):
    assert proc.poll() is None and time.time() < deadline, "no save caught in flight"
    time.sleep(0.001)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=30)
  leftover, committed = _in_flight(str(tmp_path)), _committed_steps(str(tmp_path))
  assert leftover, "the save finished before the kill landed"
  p = run_trainer(ARGS + [f"--workdir={tmp_path}"], timeout=180)
  assert p.returncode == 0, p.stderr[-2000:]
  assert f"at step {max(committed)}" in p.stderr
  assert not _in_flight(str(tmp_path))  # cleaned up
  assert logged_losses(str(tmp_path)) == uninterrupted  # bit for bit


def test_sigterm_saves_and_exits_cleanly(tmp_path, uninterrupted):
  proc = _start(str(tmp_path))
  _wait_for_step(proc, str(tmp_path), 6)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 0, err[-2000:]
  assert "SIGTERM: saved step" in err
  saved = checkpoint.Checkpointer(str(tmp_path)).latest_step()
  assert 6 <= saved < STEPS
  assert max(logged_losses(str(tmp_path))) == saved  # stopped right at the saved step
  p = run_trainer(ARGS + [f"--workdir={tmp_path}"], timeout=180)
  assert p.returncode == 0 and f"at step {saved}" in p.stderr
  assert logged_losses(str(tmp_path)) == uninterrupted  # bit for bit, as after kill -9


def _config(data, tensor, steps):
  c = smoke.get_config()
  c.mesh.update(data=data, tensor=tensor, pipe=1)
  c.model.num_heads = 4
  c.train.update(steps=steps, log_every=1)
  c.checkpoint.every_steps = 5
  del c["eval"]  # (losses are what these compare)
  return c


def test_restore_onto_other_meshes(tmp_path):
  """Saved on (4,2,1); continued on (2,4,1) and on 1 device: the same losses.

  The restored state is bit-identical; the continuation differs from the original only in
  reduction order across layouts, so the tolerance is the layout-equivalence one."""
  src = tmp_path / "src"
  trainer.train(_config(4, 2, 10), str(src))
  want = logged_losses(str(src))
  for name, (data, tensor, devices) in {"2x4": (2, 4, jax.devices()),
                                        "1dev": (1, 1, jax.devices()[:1])}.items():
    dst = tmp_path / name
    os.makedirs(dst / "checkpoints")
    shutil.copytree(src / "checkpoints" / "5", dst / "checkpoints" / "5")
    trainer.train(_config(data, tensor, 10), str(dst), devices=devices)
    got = logged_losses(str(dst))
    assert sorted(got) == list(range(6, 11)), name
    numerics.check_close(name, [got[s] for s in got], [want[s] for s in got],
                         LAYOUT_RTOL * np.abs([want[s] for s in got]))
