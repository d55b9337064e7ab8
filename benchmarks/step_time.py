r"""Step time, tokens/s and MFU of a config on 1 device and on sharded layouts, in one run.

  python -m benchmarks.step_time [--config=experiments/configs/default.py] \
      [--meshes=1x1x1,4x2x1,2x4x1] [--steps=10 --repeats=3] [--out=benchmarks/results/step_time.json]

A layout is data x tensor x pipe, optionally `:Z` for dp.zero=Z and `:0` after that for
pipeline.stage_local=False (e.g. 8x1x1:3, 2x2x2:0:0). Every layout trains the same global
batch. All are built, compiled and warmed up first; then each timed round runs one window
of `steps` steps of every layout in turn, so a slow spell of the machine hits all alike; the
step time is the median window. The ratio column is the median over rounds of the window /
the first layout's window in the same round (`paired_ratio` compares any two). On 8
virtual CPU devices (which share the host's cores) the ratio measures the overhead of
sharding (collectives, replicated element-wise work), not parallel speed-up.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from rec_llm.models.seq_transformer import flops_per_token
from rec_llm.sim.measure import time_interleaved
from rec_llm.train import config_check, throughput, trainer

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Config file.")
_MESHES = flags.DEFINE_list("meshes", ["1x1x1", "4x2x1", "2x4x1"],
                            "data x tensor x pipe[:dp.zero[:stage_local 0/1]] layouts.")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed window.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed rounds (median window reported).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/step_time.json", "Output JSON path.")


def prepare(config, spec: str, devices):
  """(row, window): the layout's description and a thunk running one window of steps."""
  shape, zero = common.layout(spec)[:2]
  config = common.layout_config(config, spec)
  run = trainer.build(config, devices[:int(np.prod(shape))])
  t = time.perf_counter()
  step = run.compile()
  compile_s = time.perf_counter() - t
  batches = [run.batches(i) for i in range(_STEPS.value)]  # input ready before timing
  box = {"state": run.state}

  def window():
    state = box["state"]
    for b in batches:
      state, m = step(state, b)
    box["state"] = state
    return m

  jax.block_until_ready(window())  # warm-up
  row = {"layout": spec, "mesh": "x".join(map(str, shape)), "zero": zero,
         "stage_local": config_check.stage_local(config, shape), "devices": int(np.prod(shape)),
         "compile_s": compile_s, "tokens": config.train.batch_size * run.model_cfg.max_len,
         "flops_per_token": flops_per_token(run.model_cfg, run.model_cfg.max_len)}
  return row, window


def paired_ratio(rows: list, spec: str, base: str) -> float:
  """Median over rounds of layout `spec`'s window / layout `base`'s window of that round."""
  by = {r["layout"]: np.asarray(r["step_time_windows_s"]) for r in rows}
  return float(np.median(by[spec] / by[base]))


def main(argv):
  del argv
  config = _CONFIG.value
  devices = jax.devices()
  # One peak for every row, so MFU compares like with like (see throughput.total_peak_flops).
  peak, source = throughput.total_peak_flops(devices[:1], float(config.train.get("peak_tflops", 0)))
  prepared = [prepare(config, spec, devices) for spec in _MESHES.value]
  windows = time_interleaved([(row["layout"], w) for row, w in prepared], _REPEATS.value)
  rows = []
  for row, _ in prepared:
    runs = [s / _STEPS.value for s in windows[row["layout"]]]
    step_s = float(np.median(runs))
    peak_n = peak if devices[0].platform == "cpu" else peak * row["devices"]
    rows.append({**row, "step_time_s": step_s, "step_time_windows_s": runs,
                 "tokens_per_s": row["tokens"] / step_s,
                 "mfu": row["flops_per_token"] * row["tokens"] / step_s / peak_n})
    rows[-1]["step_time_ratio"] = paired_ratio(rows, row["layout"], rows[0]["layout"])
    print(f"{row['layout']:>10}: {step_s * 1e3:8.1f} ms/step {rows[-1]['tokens_per_s']:10,.0f} tok/s"
          f"  MFU {100 * rows[-1]['mfu']:5.2f}%  ratio {rows[-1]['step_time_ratio']:.2f}")
  common.write(_OUT.value, {
      "benchmark": "step_time", "config": config.to_dict(), "peak_flops": peak,
      "peak_source": source, "goal": "sharded step time <= 1.3x the 1-device step", "rows": rows})


if __name__ == "__main__":
  app.run(main)
