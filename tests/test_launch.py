"""launch/local.sh: several processes form one JAX job, and a failure stops the job."""

import json
import os
import signal
import subprocess
import time

import numpy as np

from experiments.configs import smoke
from tests import numerics
from tests.conftest import ROOT
from tests.helpers import LAYOUT_RTOL, run_trainer, subprocess_env

# 3 blocks: pipe=2 then has uneven stages (2, 1), stored stage-local as slots.
ARGS = ["--config=experiments/configs/smoke.py", "--config.train.steps=6", "--config.train.log_every=1",
        "--config.model.num_layers=3"]
EVAL_USERS = smoke.get_config().data.eval_users


def _records(workdir):
  return [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]


def _losses(workdir):
  return [r["loss"] for r in _records(workdir) if "loss" in r]


def _test_metrics(workdir):
  return {k: v for r in _records(workdir) for k, v in r.items() if k.startswith("test/")}


def test_two_processes_match_one_process(tmp_path):
  """2 processes x 4 devices compute what 1 process x 8 computes, with sharded state: ZeRO-1
  and stage-local blocks on data=2 x tensor=2 x pipe=2 (each stage's blocks, 2 and 1 of them,
  and each data shard of the optimizer state on one process), and ZeRO-3 / FSDP on data=4 x
  tensor=2 (every parameter split over data, two data shards per process, gathered block by
  block): the same losses up to reordered sums, and the same evaluation."""
  one, sharded, fsdp = str(tmp_path / "one"), str(tmp_path / "sharded"), str(tmp_path / "fsdp")
  p1 = run_trainer(ARGS + [f"--workdir={one}"], timeout=180)
  assert p1.returncode == 0, p1.stderr[-3000:]
  p2 = run_trainer(ARGS + ["--config.dp.zero=1", "--config.mesh.data=2", "--config.mesh.pipe=2",
                           f"--workdir={sharded}"], timeout=180, launcher=2)
  assert p2.returncode == 0, p2.stderr[-3000:]
  assert "process 1/2" in p2.stdout + p2.stderr  # really two processes
  p3 = run_trainer(ARGS + ["--config.dp.zero=3", "--config.mesh.data=4", "--config.mesh.pipe=1",
                           f"--workdir={fsdp}"], timeout=180, launcher=2)
  assert p3.returncode == 0, p3.stderr[-3000:]
  want = _test_metrics(one)
  for name, workdir in (("zero1+pipe", sharded), ("fsdp", fsdp)):
    assert len(_losses(workdir)) == 6
    numerics.check_close(f"{name} losses", _losses(workdir), _losses(one),
                         LAYOUT_RTOL * np.abs(_losses(one)))
    # Evaluation gathers ranks from both processes: the same metrics as one process. The
    # parameters differ by the reordered cross-process sums, so a user whose target ties
    # another item to within that error may rank it either way; each such user moves a
    # metric by at most 1 / users. Near-ties that close are rare: allow one.
    got = _test_metrics(workdir)
    assert want and got.keys() == want.keys()
    for k in want:
      numerics.check(f"{name} {k}", abs(got[k] - want[k]), 1 / EVAL_USERS)


def _children(pid):
  out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
  return [int(p) for p in out.split()]


def _trainer_pid(launcher_pid, process_id):
  """The pid of trainer process `process_id` under the launcher (found by its environment)."""
  for pid in _children(launcher_pid):
    try:
      env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
    except OSError:
      continue
    if f"REC_LLM_PROCESS_ID={process_id}".encode() in env and b"python" in open(
        f"/proc/{pid}/cmdline", "rb").read():
      return pid
  return None


def test_killed_process_stops_the_job(tmp_path):
  env = subprocess_env()
  launcher = subprocess.Popen(
      ["bash", os.path.join(ROOT, "launch", "local.sh"), "2", "--config=experiments/configs/smoke.py",
       "--config.train.steps=100000", "--config.train.log_every=1", f"--workdir={tmp_path}"],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  try:
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0):  # training is under way
      assert launcher.poll() is None and time.time() < deadline, "job did not start"
      time.sleep(0.5)
    victim = _trainer_pid(launcher.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    t = time.time()
    _, err = launcher.communicate(timeout=60)
    took = time.time() - t
  finally:
    if launcher.poll() is None:
      launcher.kill()
  assert launcher.returncode != 0
  assert "process 1" in err and "killed by signal 9" in err, err[-2000:]
  assert took < 60
  assert _trainer_pid(launcher.pid, 0) is None
