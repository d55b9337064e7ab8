"""Provenance and output for benchmark JSON files."""

import json
import os
import time

import jax
import numpy as np

from experiments import provenance as provenance_lib
from rec_llm.parallel import compression, hlo_stats, mesh as mesh_lib, sharding
from rec_llm.train import trainer

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


def dp_bytes(config) -> dict:
  """HLO-measured and analytic data-parallel bytes per device per step (widest program)."""
  run = trainer.build(config)
  width = max(run.batches.widths)
  with sharding.activate(run.mesh):
    text = run.train_step.lower(run.state, run.batches.spec(width)).compile().as_text()
  wire = hlo_stats.collective_bytes(text, dict(run.mesh.shape))["wire_by_axis"]
  measured = sum(b for axes, b in wire.items() if "data" in axes.split("+"))
  dp = config.dp
  local = jax.tree.map(lambda a: a.sharding.shard_shape(a.shape), run.abstract_state.params)
  shapes = jax.tree.leaves(local, is_leaf=lambda x: isinstance(x, tuple))
  n = run.mesh.shape["data"]
  kw = dict(replicas=n, aggregator=dp.aggregator, ratio=dp.compression.ratio,
            bits=dp.compression.bits, rank=dp.compression.rank, group=dp.group)
  analytic = compression.payload_bytes(dp.compression.kind, shapes, **kw)
  every = dp.local_steps if dp.mode == "local_sgd" else 1
  return {"dp_bytes_hlo": measured / every, "dp_bytes_analytic": analytic / every,
          "tensor_bytes_hlo": sum(b for a, b in wire.items() if "data" not in a.split("+")),
          "sync_every": every}
