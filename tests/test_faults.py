"""Fault injection: a broken run never reports a good number, a damaged checkpoint never
blocks a resume, and every refusal is one `error:` line with the right exit code.

Every case runs the trainer's command line (smoke config, 8 steps, a checkpoint every 2)
and checks the exit code, the message, the checkpoints left on disk, and where a good
checkpoint exists that the resumed run continues with the uninterrupted run's losses (bit
for bit: the same program on the same state and batches).
"""

import glob
import os
import shutil

import numpy as np
import pytest

from experiments.configs import smoke
from rec_llm.numerics import nonfinite_leaves
from rec_llm.train import checkpoint, trainer
from tests import numerics
from tests.helpers import LAYOUT_RTOL, logged_losses, one_error, run_trainer

STEPS = 8
ARGS = ["--config=experiments/configs/smoke.py", f"--config.train.steps={STEPS}",
        "--config.train.log_every=1", "--config.checkpoint.every_steps=2",
        "--config.checkpoint.max_to_keep=5"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """An uninterrupted run: its workdir (checkpoints 2, 4, 6, 8) and losses."""
  workdir = tmp_path_factory.mktemp("reference")
  p = run_trainer(ARGS + [f"--workdir={workdir}"], timeout=240)
  assert p.returncode == 0, p.stderr[-3000:]
  return workdir, logged_losses(workdir)


def _copy(reference, dst, steps):
  """A workdir holding copies of the reference's checkpoints at `steps`."""
  for s in steps:
    shutil.copytree(reference / "checkpoints" / str(s), dst / "checkpoints" / str(s))
  return dst


def _state_files(workdir, step):
  return sorted(glob.glob(str(workdir / "checkpoints" / str(step) / "state" / "**" / "d" / "*"),
                          recursive=True))


def _resume(workdir, *extra, timeout=240):
  p = run_trainer(ARGS + list(extra) + [f"--workdir={workdir}"], timeout=timeout)
  assert p.returncode == 0, p.stderr[-3000:]
  return p


def _warned(p, step, workdir):
  path = os.path.join(str(workdir), "checkpoints", str(step))
  return any(f"checkpoint step {step} at {path} cannot be used" in l
             for l in p.stderr.splitlines())


def _assert_good_on_disk(workdir, steps):
  """Exactly these committed checkpoint steps, each restoring to finite values."""
  config = smoke.get_config()
  config.train.steps = STEPS
  run = trainer.build(config, init=False)
  ck = checkpoint.Checkpointer(str(workdir))
  try:
    assert ck.manager.all_steps() == sorted(steps)
    for s in steps:
      state, meta = ck.restore(run.abstract_state, s)
      assert not nonfinite_leaves(state) and meta["step"] == s
  finally:
    ck.close()


def _assert_continues(workdir, reference, start):
  """Steps start+1.. equal the uninterrupted run's losses bit for bit."""
  got, want = logged_losses(workdir), reference[1]
  assert sorted(got) == list(range(start + 1, STEPS + 1))
  assert {s: want[s] for s in got} == got


def test_truncated_array_files_fall_back_to_the_previous_checkpoint(reference, tmp_path):
  work = _copy(reference[0], tmp_path, (2, 4, 6))
  for f in _state_files(work, 6):
    with open(f, "r+b") as fh:
      fh.truncate(10)
  p = _resume(work)
  assert _warned(p, 6, work) and "at step 4" in p.stderr
  _assert_continues(work, reference, 4)
  assert os.listdir(work / "checkpoints_damaged")[0].startswith("6-")  # kept, out of the way
  _assert_good_on_disk(work, (2, 4, 6, 8))


def test_deleted_file_and_corrupt_metadata_fall_back_twice(reference, tmp_path):
  work = _copy(reference[0], tmp_path, (2, 4, 6))
  os.remove(_state_files(work, 6)[0])
  (work / "checkpoints" / "4" / "state" / "_METADATA").write_text("{not json")
  p = _resume(work)
  assert _warned(p, 6, work) and _warned(p, 4, work) and "at step 2" in p.stderr
  _assert_continues(work, reference, 2)
  _assert_good_on_disk(work, (2, 4, 6, 8))


def test_half_written_step_and_nonfinite_checkpoint_are_skipped(reference, tmp_path):
  work = _copy(reference[0], tmp_path, (2,))
  # Step 4 holds a NaN (as an old version without the guard could have saved).
  config = smoke.get_config()
  config.train.steps = STEPS
  run = trainer.build(config, init=False)
  src = checkpoint.Checkpointer(str(reference[0]))
  state, meta = src.restore(run.abstract_state, 4)
  src.close()
  state = state.replace(params={**state.params, "pos_embedding": state.params[
      "pos_embedding"].at[0, 0].set(np.nan)})
  ck = checkpoint.Checkpointer(str(work))
  ck.save(4, state, meta)
  ck.close()
  # Step 6 is a directory something else began and never finished.
  half = work / "checkpoints" / "6"
  half.mkdir()
  shutil.copy(reference[0] / "checkpoints" / "6" / "_CHECKPOINT_METADATA", half)
  p = _resume(work)
  assert _warned(p, 6, work) and _warned(p, 4, work) and "non-finite values" in p.stderr
  assert "at step 2" in p.stderr
  _assert_continues(work, reference, 2)
  _assert_good_on_disk(work, (2, 4, 6, 8))


def test_no_usable_checkpoint_is_one_error(reference, tmp_path):
  work = _copy(reference[0], tmp_path, (4,))
  for f in _state_files(work, 4):
    os.remove(f)
  line = one_error(run_trainer(ARGS + [f"--workdir={work}"], timeout=120),
                   f"no usable checkpoint in {work / 'checkpoints'}: step 4:")
  assert "to start over" in line
  assert os.listdir(work / "checkpoints") == ["4"]  # nothing moved or deleted


@pytest.mark.parametrize("flags,needles", [
    (["--config.model.d_model=64"],
     ["54 leaves differ (params/blocks/key/kernel: saved (2, 32, 4, 8), now (2, 64, 4, 16)",
      "model.d_model=32 (now 64)"]),
    (["--config.dp.compression.kind=int8", "--config.dp.aggregator=ring"],
     ["dp/comp/residual", "dp.compression.kind='none' (now 'int8')"]),
], ids=["model_shape", "dp_layout"])
def test_mismatched_checkpoint_names_the_leaves_and_fields(reference, tmp_path, flags, needles):
  work = _copy(reference[0], tmp_path, (8,))
  line = one_error(run_trainer(ARGS + flags + [f"--workdir={work}"], timeout=120),
                   "checkpoint step 8 in")
  for needle in needles:
    assert needle in line, line
  _assert_good_on_disk(work, (8,))  # untouched


def test_resume_on_another_pipeline_layout(reference, tmp_path):
  """Parameters keep the canonical [L, ...] layout on disk: a data=4 x tensor=2 checkpoint
  continues on data=4 x pipe=2 with the same losses up to reduction order."""
  work = _copy(reference[0], tmp_path, (4,))
  _resume(work, "--config.mesh.tensor=1", "--config.mesh.pipe=2",
          "--config.pipeline.microbatches=2")
  got, want = logged_losses(work), reference[1]
  assert sorted(got) == list(range(5, STEPS + 1))
  numerics.check_close("losses", [got[s] for s in got], [want[s] for s in got],
                       LAYOUT_RTOL * np.abs([want[s] for s in got]))


def test_unwritable_workdir_fails_before_compiling(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  p = run_trainer(ARGS + [f"--workdir={blocker / 'run'}"], timeout=60)
  one_error(p, f"cannot create or write the workdir '{blocker / 'run'}'")
  assert "compiled in" not in p.stderr


def test_stop_on_a_nonfinite_update_then_resume(reference, tmp_path):
  """An update that turns the state non-finite (the loss and gradients were fine) stops
  the run with exit 3; the checkpoints hold finite values, and a run without the fault
  resumes from them exactly."""
  p = run_trainer(ARGS + ["--config.train.nonfinite=stop", "--config.train.inject_nonfinite."
                          "updates=(4,)", f"--workdir={tmp_path}"], timeout=240)
  one_error(p, "1 step(s) up to step 5 had a non-finite loss, gradient or update", code=3)
  _assert_good_on_disk(tmp_path, (2, 4))
  (tmp_path / "metrics.jsonl").unlink()
  _resume(tmp_path)
  _assert_continues(tmp_path, reference, 4)


def test_evaluator_refuses_nonfinite_parameters():
  from rec_llm.errors import TrainingError
  from tests.helpers import tiny_config
  run = trainer.build(tiny_config(data=4, tensor=2))
  ev = trainer.make_evaluator(run)
  params = {**run.state.params,
            "item_embedding": run.state.params["item_embedding"] * np.float32(np.inf)}
  with pytest.raises(TrainingError, match=r"refusing to report test metrics: the parameters "
                     r"are not finite \(\['item_embedding'\]"):
    ev.evaluate(params, "test")
  assert set(ev.evaluate(run.state.params, "test")) >= {"hr@10", "ndcg@10", "mrr"}
