"""Atomic, asynchronous checkpoints of the whole train state with orbax; a resume that a
damaged checkpoint never blocks.

What is saved: params, optimizer state, the step and counters (the train state) plus a
JSON record of the data position and the run's config. Sources are pure functions of the
step, so the data position is the step itself; it is stored anyway so that a resumed run
can check it. Orbax writes each step to a temporary directory and renames it when complete,
so a killed job never leaves a half-written checkpoint that `latest` would pick (leftover
temporary directories are removed when the next run starts).

Resume (`restore_latest`) takes the newest checkpoint that can be read and holds only
finite values. One that cannot (truncated or missing files, bad metadata, a step directory
something else half wrote) is moved aside to WORKDIR/checkpoints_damaged/ with a warning
naming its step and path, and the next older one is tried; if none is left, one
`ConfigError`. A checkpoint whose tree or shapes differ from the config's state is not
damaged but mismatched: a `ConfigError` names the differing leaves and the config fields
behind them (the saved config is in the checkpoint), and nothing is moved.
"""

import logging as std_logging
import os
import shutil
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from rec_llm.errors import ConfigError
from rec_llm.numerics import nonfinite_leaves

# Config fields that decide the train state's tree and shapes (a mismatch names these).
STATE_FIELDS = ("model.", "data.", "dp.", "mesh.data", "train.optimizer", "train.momentum",
                "train.grad_clip")


def _short(e: Exception) -> str:
  """An exception in one line (TensorStore appends pages of details)."""
  text = (str(e).splitlines() or [""])[0].split(". See full TensorStore details")[0]
  return f"{type(e).__name__}: {text[:200]}"


class Unreadable(Exception):
  """A checkpoint step that cannot be used (damaged files, bad metadata, non-finite)."""


class _AbandonedReads(std_logging.Filter):
  """asyncio's 'Task exception was never retrieved' for the sibling reads of a failed
  TensorStore read (orbax gathers them; the first failure is the one reported)."""

  def filter(self, record) -> bool:
    msg = record.getMessage()
    return not (msg.startswith("Task exception was never retrieved")
                and "tensorstore" in msg.lower())


def _quiet_closed_loops() -> None:
  """After a failed read, TensorStore's callbacks for the reads still in flight find the
  event loop of orbax's call closed and raise 'Event loop is closed' as unraisable
  exceptions, and its sibling reads' failures are logged by asyncio as never retrieved:
  dozens of tracebacks that bury the warning (or the one `error:` line). They are harmless
  (the read already failed); drop exactly those, pass on the rest."""
  previous = sys.unraisablehook
  if getattr(previous, "_rec_llm_quiet", False):
    return
  std_logging.getLogger("asyncio").addFilter(_AbandonedReads())

  def hook(unraisable):
    if not (unraisable.exc_type is RuntimeError and
            str(unraisable.exc_value) == "Event loop is closed"):
      previous(unraisable)
  hook._rec_llm_quiet = True
  sys.unraisablehook = hook


def _path_key(path) -> tuple[str, ...]:
  """A tree path as plain strings, the same for a live tree and orbax's saved metadata."""
  return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _shapes(tree) -> dict[tuple[str, ...], tuple[int, ...]]:
  return {_path_key(p): tuple(getattr(x, "shape", ())) for p, x in
          jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat_config(cfg, prefix="") -> dict[str, Any]:
  out = {}
  for k, v in (cfg or {}).items():
    if isinstance(v, dict):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
  return out


def describe_mismatch(saved: dict, wanted: dict, saved_config: dict | None,
                      config: dict | None) -> str:
  """The leaves whose presence or shape differ, and the state-deciding config fields that
  differ between the saved run and this one."""
  diffs = []
  for key in sorted(set(saved) | set(wanted), key=lambda k: (k[0] != "params", k)):
    if saved.get(key) != wanted.get(key):
      name = "/".join(key)
      diffs.append(f"{name}: saved {saved[key] if key in saved else 'absent'}, "
                   f"now {wanted[key] if key in wanted else 'absent'}")
  msg = f"{len(diffs)} leaves differ ({'; '.join(diffs[:4])}{'; ...' if len(diffs) > 4 else ''})"
  if saved_config is not None and config is not None:
    a, b = _flat_config(saved_config), _flat_config(config)
    fields = [f"{k}={a.get(k)!r} (now {b.get(k)!r})" for k in sorted(set(a) | set(b))
              if k.startswith(STATE_FIELDS) and a.get(k) != b.get(k)]
    if fields:
      msg += "; it was saved with " + ", ".join(fields)
  return msg


class Checkpointer:

  def __init__(self, workdir: str, max_to_keep: int = 3):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    self.max_to_keep = max_to_keep
    self.manager = self._manager()

  def _manager(self):
    return ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=True,
                                             enable_async_checkpointing=True,
                                             cleanup_tmp_directories=True),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Starts an asynchronous save; returns once the device arrays are copied."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores onto the shardings in `abstract_state` (any mesh: orbax reshards)."""
    step = self.latest_step() if step is None else step
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    return out["state"], out["meta"]

  def _checked(self, step: int, abstract_state: Any, config: dict | None):
    """(state, meta) of `step`; Unreadable if it cannot be used, ConfigError on mismatch."""
    try:
      saved = _shapes(self.manager.item_metadata(step)["state"])
    except Exception as e:  # missing or corrupt metadata, a half-written step directory
      raise Unreadable(_short(e)) from e
    wanted = _shapes(abstract_state)
    if saved != wanted:
      try:
        saved_config = self.manager.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"].get("config")
      except Exception:
        saved_config = None
      raise ConfigError(
          f"checkpoint step {step} in {self.directory} does not match this config: "
          f"{describe_mismatch(saved, wanted, saved_config, config)}; run with the saved "
          f"settings, or give a new --workdir to start over")
    try:
      state, meta = self.restore(abstract_state, step)
    except Exception as e:  # truncated or missing array files, a corrupt meta record
      raise Unreadable(_short(e)) from e
    bad = nonfinite_leaves(state)
    if bad:
      raise Unreadable(f"non-finite values in {', '.join(bad[:3])}")
    return state, meta

  def restore_latest(self, abstract_state: Any, config: dict | None = None):
    """(state, meta) of the newest usable checkpoint, or None when there is none at all."""
    steps = sorted(self.manager.all_steps(), reverse=True)
    if not steps:
      return None
    damaged = []
    _quiet_closed_loops()  # a failed read leaves TensorStore callbacks behind
    for step in steps:
      try:
        state, meta = self._checked(step, abstract_state, config)
      except Unreadable as e:
        logging.warning("checkpoint step %d at %s cannot be used (%s); trying an older one",
                        step, os.path.join(self.directory, str(step)), e)
        damaged.append((step, str(e)))
        continue
      if damaged:
        self._set_aside([s for s, _ in damaged])
      return state, meta
    raise ConfigError(
        f"no usable checkpoint in {self.directory}: "
        + "; ".join(f"step {s}: {why}" for s, why in damaged)
        + f"; move {self.directory} away to start over")

  def _set_aside(self, steps: list[int]) -> None:
    """Moves damaged step directories out of orbax's way (kept for inspection), so that
    the run saves those steps afresh."""
    aside = os.path.join(self.workdir, "checkpoints_damaged")
    if jax.process_index() == 0:
      os.makedirs(aside, exist_ok=True)
      for s in steps:
        dest = os.path.join(aside, f"{s}-{int(time.time())}")
        shutil.move(os.path.join(self.directory, str(s)), dest)
        logging.warning("moved the unusable checkpoint step %d to %s", s, dest)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("rec_llm_checkpoints_set_aside")
    self.manager.close()
    self.manager = self._manager()

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
