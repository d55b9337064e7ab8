r"""Step time, tokens/s and MFU of a config on 1 device and on sharded meshes, in one run.

  python -m benchmarks.step_time [--config=experiments/configs/default.py] \
      [--meshes=1x1x1,4x2x1,2x4x1] [--steps=10 --repeats=3] [--out=benchmarks/results/step_time.json]

A mesh is data x tensor x pipe, optionally `:Z` for dp.zero=Z (e.g. 8x1x1:3).
Every mesh trains the same global batch; the ratio column is step time / the first mesh's.
On 8 virtual CPU devices (which share the host's cores) the ratio measures the overhead
of sharding (collectives, replicated element-wise work), not parallel speed-up.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from rec_llm.models.seq_transformer import flops_per_token
from rec_llm.parallel import mesh as mesh_lib
from rec_llm.train import throughput, trainer

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Config file.")
_MESHES = flags.DEFINE_list("meshes", ["1x1x1", "4x2x1", "2x4x1"], "data x tensor x pipe shapes.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed window.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed windows per mesh (median reported).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/step_time.json", "Output JSON path.")


def time_mesh(config, shape, devices, peak, zero=0):
  config = config.copy_and_resolve_references()
  config.mesh.update(dict(zip(mesh_lib.MESH_AXES, shape)))
  config.dp.zero = zero
  run = trainer.build(config, devices)
  timed = common.time_steps(run, _STEPS.value, _REPEATS.value)
  step_s, windows, compile_s = timed["step_time_s"], timed["windows_s"], timed["compile_s"]
  mc = run.model_cfg
  tokens = config.train.batch_size * mc.max_len
  return {"mesh": "x".join(map(str, shape)), "zero": zero, "devices": len(devices),
          "compile_s": compile_s,
          "step_time_s": step_s, "step_time_windows_s": windows, "tokens_per_s": tokens / step_s,
          "mfu": flops_per_token(mc, mc.max_len) * tokens / step_s / peak}


def main(argv):
  del argv
  config = _CONFIG.value
  devices = jax.devices()
  # One peak for every row, so MFU compares like with like (see throughput.total_peak_flops).
  peak, source = throughput.total_peak_flops(devices[:1], float(config.train.get("peak_tflops", 0)))
  rows = []
  for spec in _MESHES.value:
    mesh, _, zero = spec.partition(":")
    shape = tuple(int(x) for x in mesh.split("x"))
    n = int(np.prod(shape))
    peak_n = peak if devices[0].platform == "cpu" else peak * n
    rows.append(time_mesh(config, shape, devices[:n], peak_n, int(zero or 0)))
    base = rows[0]["step_time_s"]
    rows[-1]["step_time_ratio"] = rows[-1]["step_time_s"] / base
    print(f"{spec:>10}: {rows[-1]['step_time_s'] * 1e3:8.1f} ms/step "
          f"{rows[-1]['tokens_per_s']:10,.0f} tok/s  MFU {100 * rows[-1]['mfu']:5.2f}%  "
          f"ratio {rows[-1]['step_time_ratio']:.2f}")
  common.write(_OUT.value, {
      "benchmark": "step_time", "config": config.to_dict(), "peak_flops": peak,
      "peak_source": source, "goal": "sharded step time <= 1.3x the 1-device step", "rows": rows})


if __name__ == "__main__":
  app.run(main)
