r"""Pipeline schedules x meshes on 8 virtual devices: step time, peak memory, collective bytes
(measured from the compiled HLO vs the analytic formulas) and bubble fraction, in JSON.

  python -m benchmarks.pipeline [--meshes=4x1x2,2x2x2,2x1x4,1x2x4] [--schedules=gpipe,1f1b] \
      [--stage_layers=1,3,3,1] [--steps=3] [--zero=0] [--out=benchmarks/results/pipeline.json]

Model: experiments/configs/default.py with 8 blocks; microbatches = 2 * pipe (the regime
where 1F1B must need less memory than GPipe). Bytes are payload bytes per device per
step (rec_llm/parallel/hlo_stats.py); collectives inside the per-tick branches are
counted as if every branch ran every tick, and those inside a stage's block loops as if
every stage had the longest stage's blocks; the formulas count the same way (parameter
counts from rec_llm/models/arithmetic.py, the data axis's reductions and ZeRO gathers from
rec_llm.sim.simulator.dp_reductions). Stages are stage-local (pipeline.stage_local, the
default, uneven ones included: each keeps its blocks' gradients, no gather over pipe). Step times on virtual CPU devices only compare as ratios
within one run.
"""

import os
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import numpy as np
from absl import app, flags

from benchmarks import common
from experiments.configs import default
from rec_llm.models import arithmetic
from rec_llm.parallel import hlo_stats, schedules
from rec_llm.sim import cost_model as cm, simulator as sim
from rec_llm.train import adaptive, config_check, trainer

_MESHES = flags.DEFINE_list("meshes", ["4x1x2", "2x2x2", "2x1x4", "1x2x4"], "data x tensor x pipe.")
_SCHEDULES = flags.DEFINE_list("schedules", ["gpipe", "1f1b"], "Schedules.")
_STAGE_LAYERS = flags.DEFINE_list("stage_layers", ["1", "3", "3", "1"],
                                  "Also run these blocks per stage on meshes with as many stages.")
_LAYERS = flags.DEFINE_integer("layers", 8, "model.num_layers.")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (median reported).")
_ZERO = flags.DEFINE_integer("zero", 0, "dp.zero (0 or 1; 3 does not run with a pipeline).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/pipeline.json", "Output JSON path.")


def analytic_bytes(config, mc, batch, shape, micro, sizes, remat, local):
  """Payload bytes per device per step, by mesh axis (float32; see README 'Pipeline')."""
  data, tensor, pipe = shape
  width = max(sizes)
  b, d, s = 4, mc.d_model, mc.max_len
  rows = batch // (data * micro)                       # rows of one microbatch on one device
  act = rows * s * d * b                               # one activation [rows, seq, d]
  ticks = 2 * (micro + pipe - 1)
  block, shared = arithmetic.block_params(mc, tensor), arithmetic.shared_params(mc, tensor)
  plan = sim.Plan(data=data, tensor=tensor, pipe=pipe, zero=int(config.dp.zero),
                  stage_layers=tuple(sizes))
  dp = sim.dp_reductions(cm.ModelSpec.from_config(config), plan, width, 1)
  return {
      # the stage's gradient slots and the shared gradients reduced once (+ the count);
      # under ZeRO-1, the parameters gathered after the update
      "data": (b * sum(r.numel for r in dp) + 4) if data > 1 else 0,
      # activations forward + gradients backward every tick; shared grads summed over
      # stages; unless stage-local, the stage-major gradient slots (P x W, padding
      # included) gathered once
      "pipe": 2 * ticks * act + b * shared + (0 if local else b * pipe * width * block),
      # per tick, as if both branches ran: forward = embedding psum + 2 per block slot +
      # head dh psum; backward = 4 per block slot (+2 with remat); head statistics 4 x [rows, s]
      "tensor": (ticks * (act * (2 + (6 + 2 * remat) * width) + 4 * rows * s * 4)
                 if tensor > 1 else 0),
  }


def run_one(shape, schedule, stage_layers):
  data, tensor, pipe = shape
  c = default.get_config()
  c.mesh.update(data=data, tensor=tensor, pipe=pipe)
  c.model.num_layers = _LAYERS.value
  micro = 2 * pipe
  sizes = tuple(stage_layers) if (stage_layers and len(stage_layers) == pipe) else ()
  c.pipeline.update(schedule=schedule, microbatches=micro, stage_layers=sizes)
  c.dp.zero = _ZERO.value
  c.eval.every_steps = 0
  run = trainer.build(c)
  t = time.perf_counter()
  compiled = run.compile()
  compile_s = time.perf_counter() - t
  program = compiled.executables[max(compiled.executables)]  # the widest batch's program
  mem = program.memory_analysis()
  state = run.state
  batches = [run.batches(i) for i in range(_STEPS.value + 1)]
  state, m = compiled(state, batches[0])
  jax.block_until_ready(m)
  times = []
  for bt in batches[1:]:
    t = time.perf_counter()
    state, m = compiled(state, bt)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t)
  run.state = state  # the step donates its input state
  mc = run.model_cfg
  sizes = schedules.stage_sizes(mc.num_layers, pipe, sizes)
  # The stages' block loops run each stage's own count: counted at the longest stage's.
  measured = hlo_stats.collective_bytes(program.as_text(), dict(run.mesh.shape),
                                        unknown_trip_count=max(sizes))
  local = config_check.stage_local(c, shape)
  formula = analytic_bytes(c, mc, c.train.batch_size, shape, micro, sizes,
                           bool(c.pipeline.remat), local)
  check = {}
  for axis, want in formula.items():
    got = measured["by_axis"].get(axis, 0)
    check[axis] = {"measured": got, "analytic": want,
                   "rel_err": abs(got - want) / want if want else float(got != 0),
                   "within_5pct": (abs(got - want) <= 0.05 * want) if want else got == 0}
  sched = schedules.build(schedule, pipe, micro)
  return {"mesh": f"{data}x{tensor}x{pipe}", "schedule": schedule, "stage_layers": list(sizes),
          "zero": c.dp.zero, "stage_local": local,
          "microbatches": micro, "compile_s": compile_s,
          "step_time_s": float(np.median(times)), "loss_after": float(m["loss"]),
          "memory": {"temp_bytes": mem.temp_size_in_bytes,
                     "argument_bytes": mem.argument_size_in_bytes,
                     "output_bytes": mem.output_size_in_bytes,
                     "alias_bytes": mem.alias_size_in_bytes,
                     "peak_bytes": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                                    - mem.alias_size_in_bytes + mem.temp_size_in_bytes)},
          "in_flight_microbatches": sched.in_flight, "ticks": sched.ticks,
          "bubble_fraction_analytic": schedules.analytic_bubble(pipe, micro),
          "bubble_fraction_schedule": schedules.bubble_fraction(sched),
          "collective_bytes": measured, "bytes_check": check}, run, sizes


def main(argv):
  del argv
  rows = []
  for spec in _MESHES.value:
    shape = tuple(int(x) for x in spec.split("x"))
    sl = [int(x) for x in _STAGE_LAYERS.value]
    for partition, schedule in [(p, s) for p in [[]] + ([sl] if len(sl) == shape[2] else [])
                                for s in _SCHEDULES.value]:
      row, run, sizes = run_one(shape, schedule, partition)
      if schedule == _SCHEDULES.value[-1]:
        t, = adaptive.measure_stage_times(run, run.state, run.batches(0), [sizes], stat=np.median)
        sched = schedules.build(schedule, shape[2], row["microbatches"])
        row["stage_time_s"] = adaptive.stage_seconds(t)
        row["stage_tick_s"] = t
        row["bubble_fraction_measured_stage_times"] = schedules.bubble_fraction(
            sched, t["fwd"], t["bwd"])
      rows.append(row)
      print(f"{row['mesh']} {schedule:5s} stages={row['stage_layers']} "
            f"{row['step_time_s'] * 1e3:7.1f} ms  temp {row['memory']['temp_bytes'] / 2**20:6.1f} MiB  "
            f"bubble {row['bubble_fraction_schedule']:.3f}  bytes " +
            " ".join(f"{a} {v['measured']}/{v['analytic']:.0f}" for a, v in row["bytes_check"].items()),
            flush=True)
  mem = {}
  for r in rows:
    mem.setdefault((r["mesh"], tuple(r["stage_layers"])), {})[r["schedule"]] = r["memory"]["peak_bytes"]
  summary = {
      "1f1b_peak_below_gpipe": {f"{k[0]} {list(k[1])}": v.get("1f1b", 0) < v.get("gpipe", 0)
                                for k, v in mem.items() if len(v) == 2},
      "all_bytes_within_5pct": all(c["within_5pct"] for r in rows for c in r["bytes_check"].values())}
  print(summary)
  common.write(_OUT.value, {
      "benchmark": "pipeline", "model": {**default.get_config().model.to_dict(), "num_layers": _LAYERS.value},
      "formulas": {
          "data": "4*(W*blk + sh) + 4 bytes: one all-reduce of stage grads + shared grads + count; "
                  "ZeRO-1 adds the all-gather of the split parameters (sim.dp_reductions)",
          "pipe": "2*T*A (collective-permute) + 4*sh (all-reduce) + 4*P*W*blk (all-gather, "
                  "unless stage-local)",
          "tensor": "T*(A*(2 + 6W + 2W*remat) + 16*r*S) (all-reduce; per-tick branches counted as taken)",
          "where": "A = r*S*d*4 with r = batch/(data*M) rows per microbatch; T = 2(M+P-1) ticks; "
                   "W = max blocks per stage; blk = (4dh + 2df + 2h + f)/t + 6d; "
                   "sh = V*d/t + S*d + 2d"},
      "summary": summary, "rows": rows})


if __name__ == "__main__":
  app.run(main)
