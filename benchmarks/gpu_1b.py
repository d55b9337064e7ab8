r"""A >1B-parameter recommender on one GPU in bf16: tokens/s, MFU and peak memory, in JSON.

  python -m benchmarks.gpu_1b [--num_items=100000 --batch_size=32 --steps=10 --repeats=3] \
      [--out=benchmarks/results/gpu_1b.json]
  python -m benchmarks.gpu_1b --dry_run --out=/tmp/gpu_1b_dry_run.json   # tiny model, any device

Model: the blocks of experiments/configs/large_1b.py (24 x d 2048, 16 heads, mlp 8192:
1.21B parameters), bf16 activations, remat, sequences of 200, on a 100K-item table
(0.2B parameters): about 1.4B parameters, whose float32 values, gradients and Adam moments
(16 bytes each, ~23 GB) fit one 80 GB H100 with the activations and the [tokens, items/t]
logits. The shipped 2M-item table (4.1B parameters, ~66 GB of state) needs tensor > 1.
Budget on one H100: compile about a minute, 1 + repeats x steps steps (rec_llm.sim predicts
0.22 s per step at batch 32, MFU ~26%, ~30 GiB), initialisation seconds: well under the
8 minutes `--max_seconds` enforces (the script exits with an error rather than run on).

Reports per device: step time (median of `repeats` windows of `steps` steps after a warm-up
step), tokens/s (batch x 200 positions / step time), MFU (model FLOPs, rec_llm's formula, over
the chip's dense bf16 peak: 989 TFLOP/s for an H100), peak memory from XLA's
`compiled.memory_analysis()` (arguments + outputs - aliases + temporaries) and, on GPUs, the
allocator's `peak_bytes_in_use`, with provenance. Without a GPU it refuses (exit 2) unless
`--dry_run`, which runs a tiny model for 2 steps to check the script end to end.
"""

import os
import sys
import threading
import time

from absl import app, flags

_NUM_ITEMS = flags.DEFINE_integer("num_items", 100_000, "Items in the table.")
_BATCH = flags.DEFINE_integer("batch_size", 32, "Sequences per step (global).")
_DEVICES = flags.DEFINE_integer("devices", 1, "GPUs to use (data parallel over them).")
_STEPS = flags.DEFINE_integer("steps", 10, "Steps per timed window.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed windows (median reported).")
_MAX_SECONDS = flags.DEFINE_integer("max_seconds", 480, "Give up (exit 3) after this long.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Tiny model, 2 steps, any platform.")
_OUT = flags.DEFINE_string("out", None, "Output JSON (default benchmarks/results/gpu_1b.json; "
                           "with --dry_run /tmp/gpu_1b_dry_run.json).")


def _fail(msg: str, code: int = 2):
  print(f"error: {msg}", file=sys.stderr, flush=True)
  sys.exit(code)


def make_config(dry_run: bool):
  from experiments.configs import large_1b
  c = large_1b.get_config()
  c.mesh.update(data=_DEVICES.value, tensor=1, pipe=1)
  c.model.update(dtype="bfloat16", remat=True)
  c.data.num_items = _NUM_ITEMS.value
  c.train.update(batch_size=_BATCH.value, steps=1 + _REPEATS.value * _STEPS.value, warmup_steps=1)
  if dry_run:  # the same code path at a size any CPU compiles in seconds
    c.model.update(num_layers=2, d_model=64, num_heads=4, mlp_dim=128, max_len=16)
    c.data.num_items = 1000
    c.train.update(batch_size=8 * _DEVICES.value, steps=2)
  del c["eval"]
  c.checkpoint.every_steps = 0
  return c


def run(dry_run: bool) -> dict:
  import jax
  from benchmarks import common
  from rec_llm.models.seq_transformer import count_params, flops_per_token
  from rec_llm.sim import measure
  from rec_llm.train import throughput, trainer
  devices = jax.devices()[:_DEVICES.value]
  config = make_config(dry_run)
  t = time.perf_counter()
  run_ = trainer.build(config, devices)
  jax.block_until_ready(run_.state)
  init_s = time.perf_counter() - t
  mc = run_.model_cfg
  params = count_params(mc)
  steps, repeats = (1, 1) if dry_run else (_STEPS.value, _REPEATS.value)
  timed = common.time_steps(run_, steps, repeats)
  step, m, step_s = timed["step"], timed["last_metrics"], timed["step_time_s"]
  mem = measure.memory_of(step.executables[max(step.executables)])
  peak, peak_src = throughput.total_peak_flops(devices)
  tokens = config.train.batch_size * mc.max_len
  stats = devices[0].memory_stats() or {}
  return {"benchmark": "gpu_1b", "dry_run": dry_run, "config": config.to_dict(),
          "params": params, "params_total": sum(params.values()), "devices": len(devices),
          "device_kind": devices[0].device_kind, "batch_size": config.train.batch_size,
          "seq_len": mc.max_len, "init_s": init_s, "compile_s": timed["compile_s"],
          "step_time_s": step_s, "windows_s": timed["windows_s"], "tokens_per_s": tokens / step_s,
          "mfu": flops_per_token(mc, mc.max_len) * tokens / step_s / peak,
          "peak_flops": peak, "peak_source": peak_src, "memory": mem,
          "device_peak_bytes_in_use": stats.get("peak_bytes_in_use"),
          "device_bytes_limit": stats.get("bytes_limit"), "loss": float(m["loss"])}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  dry = _DRY_RUN.value
  out = _OUT.value or ("/tmp/gpu_1b_dry_run.json" if dry else "benchmarks/results/gpu_1b.json")
  if _DEVICES.value < 1 or _STEPS.value < 1 or _REPEATS.value < 1 or _BATCH.value % _DEVICES.value:
    _fail("--devices, --steps and --repeats must be >= 1 and --batch_size divisible by --devices")
  import jax
  platform = jax.devices()[0].platform
  if platform != "gpu" and not dry:
    _fail(f"benchmarks/gpu_1b.py needs a GPU (this machine has {platform}: "
          f"{jax.devices()[0].device_kind}): ~23 GB of training state and minutes per step. "
          "Use --dry_run for a tiny end-to-end check")
  if len(jax.devices()) < _DEVICES.value:
    _fail(f"--devices={_DEVICES.value} but only {len(jax.devices())} {platform} device(s)")
  # A budget, not a hang: give up with a clear message if anything runs long.
  timer = threading.Timer(_MAX_SECONDS.value, lambda: (print(
      f"error: gpu_1b did not finish in --max_seconds={_MAX_SECONDS.value}s; try a smaller "
      "--batch_size or --steps", file=sys.stderr, flush=True), os._exit(3)))
  timer.daemon = True
  timer.start()
  result = run(dry)
  timer.cancel()
  from benchmarks import common
  common.write(out, result)
  print(f"{result['params_total'] / 1e6:,.1f}M parameters on {result['devices']} x "
        f"{result['device_kind']}: {result['step_time_s'] * 1e3:.1f} ms/step, "
        f"{result['tokens_per_s']:,.0f} tokens/s, MFU {100 * result['mfu']:.1f}%, peak memory "
        f"{result['memory'].get('peak_bytes', 0) / 2**20:,.0f} MiB (XLA)"
        + (" [dry run]" if dry else ""))


if __name__ == "__main__":
  app.run(main)
