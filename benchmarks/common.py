"""Provenance and output for benchmark JSON files."""

import json
import os
import time

import jax
import numpy as np

from experiments import provenance as provenance_lib

ROOT = provenance_lib.ROOT
provenance = provenance_lib.provenance  # command, git commit, jax version, device kind, ...


def write(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"provenance": provenance(), **result}, f, indent=2)
  os.replace(path + ".tmp", path)  # never a half-written result
  print(f"wrote {path}")


def time_steps(run, steps: int, repeats: int) -> dict:
  """Compiles `run`'s step, then times `repeats` windows of `steps` steps (inputs built first,
  one warm-up step); the median window is the step time."""
  t = time.perf_counter()
  step = run.compile()
  compile_s = time.perf_counter() - t
  state = run.state
  batches = [run.batches(i) for i in range(steps)]  # input ready before timing
  state, m = step(state, batches[0])  # warm-up
  jax.block_until_ready(m)
  windows = []
  for _ in range(repeats):
    t = time.perf_counter()
    for b in batches:
      state, m = step(state, b)
    jax.block_until_ready(m)
    windows.append((time.perf_counter() - t) / len(batches))
  return {"step": step, "compile_s": compile_s, "step_time_s": float(np.median(windows)),
          "windows_s": windows, "last_metrics": m}
