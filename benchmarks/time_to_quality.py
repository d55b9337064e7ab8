r"""Time to quality: test-split ranking quality against wall time from launch.

  python -m benchmarks.time_to_quality --config=experiments/configs/ml1m_fast.py \
      --config.data.path=../shared/data/sasrec/ml-1m.txt --budget_s=420 --every_s=60 \
      --out=benchmarks/results/time_to_quality_ml1m_fast.json

Trains `config` until `budget_s` seconds after launch (or config.train.steps) and, every
`every_s` seconds of that clock and at the end, ranks the test split under both protocols:
the full ranking over every item (the config's eval.filter_seen) and the SASRec paper's 100
sampled negatives. The clock starts when this process starts, so imports, data preparation
and compilation count; it stops while evaluating (evaluation is measurement, not training).
Each point: wall seconds, step, epoch, HR@10 and NDCG@10 under both. Also the training
throughput in non-padding positions per second (after compilation) and its MFU.
One config per run (a fresh process, so that its launch costs count); the notebook
(notebooks/explore_results.ipynb) draws the curves of several runs on one figure.
"""

import time

_LAUNCH = time.perf_counter()  # before the heavy imports: they count

import dataclasses  # noqa: E402
import os  # noqa: E402

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/ml1m_fast.py", "Config file.")
_BUDGET = flags.DEFINE_float("budget_s", 420.0, "Stop training this many seconds after launch.")
_EVERY = flags.DEFINE_float("every_s", 60.0, "Evaluate every this many seconds of training clock.")
_NEGATIVES = flags.DEFINE_integer("negatives", 100, "Negatives of the sampled protocol.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/time_to_quality.json", "Output JSON path.")


def _evaluators(run, trainer):
  """(full ranking, sampled) evaluators on the test split."""
  full = trainer.make_evaluator(run)
  sampled_cfg = run.config.copy_and_resolve_references()
  sampled_cfg.eval.num_negatives = _NEGATIVES.value
  sampled = trainer.make_evaluator(dataclasses.replace(run, config=sampled_cfg))
  return full, sampled


def _point(run, state, evals, clock, done, spe):
  params = run.layout.canonical(state.params, "params")
  out = {"wall_s": clock, "step": done, "epoch": done / spe if spe else None}
  for name, ev in zip(("full", "sampled"), evals):
    m = ev.evaluate(params, "test")
    out.update({f"{name}/hr@10": m["hr@10"], f"{name}/ndcg@10": m["ndcg@10"]})
  print(f"{clock:7.1f}s step {done:5d} epoch {out['epoch'] or 0:5.2f} | full HR@10 "
        f"{out['full/hr@10']:.4f} NDCG@10 {out['full/ndcg@10']:.4f} | 100 sampled HR@10 "
        f"{out['sampled/hr@10']:.4f} NDCG@10 {out['sampled/ndcg@10']:.4f}", flush=True)
  return out


def train_with_evals(config, trainer, loader):
  """Trains on the benchmark's clock; returns (curve points, throughput record)."""
  paused = 0.0
  clock = lambda: time.perf_counter() - _LAUNCH - paused
  run = trainer.build(config)
  t = time.perf_counter()
  step_fn = run.compile()
  compile_s = time.perf_counter() - t
  evals = _evaluators(run, trainer)
  spe = run.source.steps_per_epoch
  state, points, next_eval = run.state, [], _EVERY.value
  t_train, p_steps, done = None, 0, 0
  for step, batch in loader.prefetch(run.batches, 0, int(config.train.steps)):
    state, metrics = step_fn(state, batch)
    done = step + 1
    if t_train is None:  # throughput from the second step on (the first may finish compiles)
      state = jax.block_until_ready(state)
      t_train, p_steps = clock(), done
    if clock() >= min(next_eval, _BUDGET.value):
      jax.block_until_ready(state)
      now, t = clock(), time.perf_counter()
      points.append(_point(run, state, evals, now, done, spe))
      paused += time.perf_counter() - t
      next_eval = now + _EVERY.value
      if now >= _BUDGET.value:
        break
  jax.block_until_ready(state)
  if not points or points[-1]["step"] != done:
    points.append(_point(run, state, evals, clock(), done, spe))
  return run, points, {"compile_s": compile_s, "train_s": points[-1]["wall_s"] - t_train,
                       "timed_steps": done - p_steps}


def main(argv):
  del argv
  config = _CONFIG.value
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    from experiments import cli
    jax.config.update("jax_num_cpu_devices", cli.host_devices(config, 0))
  import numpy as np
  from benchmarks import common
  from rec_llm.data import loader
  from rec_llm.train import throughput, trainer
  run, points, timing = train_with_evals(config, trainer, loader)
  # Non-padding training positions of the timed steps, recomputed from the (pure) data.
  steps = range(points[-1]["step"] - timing["timed_steps"], points[-1]["step"])
  valid = sum(int((np.asarray(run.source.rows(s, 0, config.train.batch_size))[:, 1:] != 0).sum())
              for s in steps)
  per_s = valid / timing["train_s"]
  peak, src = throughput.total_peak_flops(list(run.mesh.devices.flat), float(config.train.peak_tflops))
  flops_of = trainer.step_flops(run)  # (not a Meter: it would measure the peak again)
  flops = sum(flops_of[run.source.row_len(s) - 1] for s in steps)
  mfu = flops / timing["train_s"] / peak
  print(f"{per_s:,.0f} non-padding positions/s, MFU {100 * mfu:.2f}% ({src}), "
        f"compile {timing['compile_s']:.1f}s")
  common.write(_OUT.value, {
      "benchmark": "time_to_quality", "config": config.to_dict(), "budget_s": _BUDGET.value,
      "every_s": _EVERY.value, "clock": "seconds from process start, evaluation excluded",
      "protocols": {"full": f"every item, filter_seen={bool(config.eval.filter_seen)}",
                    "sampled": f"{_NEGATIVES.value} sampled negatives"},
      "points": points, "positions_per_s": per_s, "mfu": mfu, "peak_flops": peak,
      "peak_source": src, **timing})


if __name__ == "__main__":
  app.run(main)
