r"""Seconds per training epoch of a config on its own mesh, from its real batch widths.

  python -m benchmarks.epoch_time --config=experiments/configs/ml1m_sasrec.py \
      --config.data.path=../shared/data/sasrec/ml-1m.txt \
      --out=benchmarks/results/epoch_time_ml1m_sasrec.json

Length-bucketed data has batches of a few widths: each width's step is timed (the median
of `steps` steps after a warm-up step that compiles it) and weighted by how many of the
epoch's batches have that width. The process gets as many virtual CPU devices as the mesh
has (unless XLA_FLAGS sets a count), as `experiments.train` does. Also: compile seconds,
non-padding training positions per second over the epoch, and MFU (the trainer's FLOPs per
width, `trainer.step_flops`, against the peak `train.peak_tflops` gives or a matmul measures).
"""

import os
import time

import jax
import numpy as np
from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/ml1m_sasrec.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per width (median reported).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/epoch_time.json", "Output JSON path.")


def epoch_time(config, trainer, throughput) -> dict:
  run = trainer.build(config)
  t = time.perf_counter()
  step = run.compile()
  compile_s = time.perf_counter() - t
  spe = int(run.source.steps_per_epoch)
  by_width = {}
  for i in range(spe):
    by_width.setdefault(run.source.row_len(i) - 1, []).append(i)
  state, widths, valid = run.state, [], 0
  for w, idx in sorted(by_width.items()):
    state, m = step(state, run.batches(idx[0]))  # warm-up (the first batch compiles)
    jax.block_until_ready(m)
    times = []
    for i in (idx[1:] or idx)[:_STEPS.value]:
      batch = jax.block_until_ready(run.batches(i))  # input ready: time the step alone
      t = time.perf_counter()
      state, m = step(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t)
    valid += sum(int((np.asarray(run.source.rows(i, 0, config.train.batch_size))[:, 1:] != 0).sum())
                 for i in idx)
    widths.append({"width": w, "batches": len(idx), "step_s": float(np.median(times)),
                   "step_times_s": times})
    print(f"width {w}: {len(idx)} batches, {1000 * widths[-1]['step_s']:.0f} ms/step", flush=True)
  epoch_s = sum(r["batches"] * r["step_s"] for r in widths)
  flops_of = trainer.step_flops(run)
  peak, src = throughput.total_peak_flops(list(run.mesh.devices.flat), float(config.train.peak_tflops))
  mfu = sum(r["batches"] * flops_of[r["width"]] for r in widths) / epoch_s / peak
  print(f"epoch {epoch_s:.1f} s ({spe} steps), {valid / epoch_s:,.0f} non-padding positions/s, "
        f"MFU {100 * mfu:.1f}% ({src}), compile {compile_s:.1f} s", flush=True)
  return {"mesh": dict(config.mesh), "devices": run.mesh.devices.size, "steps_per_epoch": spe,
          "epoch_s": epoch_s, "positions_per_epoch": valid, "positions_per_s": valid / epoch_s,
          "mfu": mfu, "peak_flops": peak, "peak_source": src, "compile_s": compile_s,
          "widths": widths}


def main(argv):
  del argv
  config = _CONFIG.value
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    from experiments import cli
    jax.config.update("jax_num_cpu_devices", cli.host_devices(config, 0))
  from benchmarks import common
  from rec_llm.train import throughput, trainer
  common.write(_OUT.value, {"benchmark": "epoch_time", "config": config.to_dict(),
                            **epoch_time(config, trainer, throughput)})


if __name__ == "__main__":
  app.run(main)
