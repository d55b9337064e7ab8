"""Provenance and output for benchmark JSON files."""

import json
import os
import time

import jax
import numpy as np

from experiments import provenance as provenance_lib
from rec_llm.parallel import mesh as mesh_lib

ROOT = provenance_lib.ROOT
provenance = provenance_lib.provenance  # command, git commit, jax version, device kind, ...


def write(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"provenance": provenance(), **result}, f, indent=2)
  os.replace(path + ".tmp", path)  # never a half-written result
  print(f"wrote {path}")


def layout(spec: str) -> tuple[tuple[int, ...], int, bool, tuple[int, ...]]:
  """'DxTxP[:zero[:stage_local 0/1[:stage_layers as 1-3-3-1]]]' -> (mesh shape, dp.zero,
  pipeline.stage_local, pipeline.stage_layers (() for even stages))."""
  parts = spec.split(":") + [""] * 3
  mesh, zero, local, sizes = parts[0], parts[1] or "0", parts[2] or "1", parts[3]
  return (tuple(int(x) for x in mesh.split("x")), int(zero), bool(int(local)),
          tuple(int(n) for n in sizes.split("-") if n))


def layout_config(config, spec: str):
  """A copy of `config` on the layout `spec` (see `layout`)."""
  shape, zero, local, sizes = layout(spec)
  config = config.copy_and_resolve_references()
  config.mesh.update(dict(zip(mesh_lib.MESH_AXES, shape)))
  config.dp.zero, config.pipeline.stage_local = zero, local
  config.pipeline.stage_layers = sizes
  return config


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
