r"""Calibrate the 'this_machine' cluster from measurements, then predict real step times.

  python -m benchmarks.sim_calibration [--config=experiments/configs/default.py] \
      [--fit_plans=1x1x1,8x1x1,...] [--mp_fit_plans=8x1x1,4x2x1] \
      [--plans=4x1x2:1f1b:4,...] [--mp_plans=2x4x1,4x1x2:1f1b:8] [--steps=5 --repeats=5]

1. rec_llm/sim/measure.py on the 8 virtual CPU devices (components, collectives, ...), and
   the cross-process collectives from 2 processes x 4 devices.
2. The *fit* plans trained for real (`trainer.build` + `run.compile()`, median of timed
   windows after a warm-up step; `--mp_fit_plans` as 2 processes x 4 devices, one JAX job
   through jax.distributed, `data` spanning the processes), and the simulator's in-step
   corrections fitted to them (rec_llm/sim/calibrate.py). Steps 1-2 are the
   calibration, written on their own to `--calibration_out` (what `--cluster=this_machine
   --calibration=FILE` loads; rec_llm/sim/this_machine.json is a copy).
3. The *validation* plans (`--plans`, `--mp_plans`), none of them a fit plan, timed the
   same way and predicted from the calibration alone: measured vs predicted, relative
   error, Spearman rank correlation. Only these rows count toward the target.
4. A second check: leave-one-out over every timed plan (each predicted by corrections
   fitted to all the others).

The corrections need many fit plans: with about one plan per correction the fit follows the
noise of single timings (a correction trades against another from run to run).

`--calibration=FILE` skips steps 1-2 and uses that file. `--from_results=FILE` re-fits and
re-predicts a previous run's measurements (no timing), for checking a cost-model change
against the same numbers. CPU timings are noisy on the shared 2-core machine: run it with
nothing else running, and compare within one run.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from benchmarks import common

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Config file.")
_FIT_PLANS = flags.DEFINE_list("fit_plans", ["1x1x1", "8x1x1", "4x2x1", "2x4x1", "4x1x2:1f1b:8",
                                             "4x1x2:1f1b:16", "4x1x2:gpipe:8", "2x1x4:1f1b:8",
                                             "2x2x2:1f1b:4", "1x2x4:gpipe:8"],
                               "Plans whose timed steps fit the corrections (this process).")
_MP_FIT_PLANS = flags.DEFINE_list("mp_fit_plans", ["8x1x1", "4x2x1"],
                                  "Fit plans run as 2 processes x 4 devices.")
_PLANS = flags.DEFINE_list(
    "plans", ["4x1x2:1f1b:4", "4x1x2:gpipe:4", "2x2x2:gpipe:4", "2x1x4:gpipe:8",
              "2x1x4:gpipe:16", "1x4x2:1f1b:8", "2x2x2:1f1b:8", "1x2x4:1f1b:8", "2x2x2:gpipe:8"],
    "Validation plans, DATAxTENSORxPIPE[:schedule:microbatches], run in this process.")
_MP_PLANS = flags.DEFINE_list("mp_plans", ["2x4x1", "4x1x2:1f1b:8"],
                              "Validation plans run as 2 processes x 4 devices.")
_STEPS = flags.DEFINE_integer("steps", 5, "Steps per timed window.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed windows per plan (median reported).")
_OUT = flags.DEFINE_string("out", "benchmarks/results/sim_calibration.json", "Result JSON.")
_CAL_OUT = flags.DEFINE_string("calibration_out", "benchmarks/results/this_machine_calibration.json",
                               "Where the calibration alone is written.")
_FROM = flags.DEFINE_string("from_results", None, "Re-predict this result file's measurements.")
_REUSE = flags.DEFINE_string("calibration", None, "Use this calibration file instead of measuring.")
_ROLE = flags.DEFINE_string("role", "main", "Internal: 'mp_collectives' / 'mp_plan' in the 2-process runs.")
_ROLE_OUT = flags.DEFINE_string("role_out", "", "Internal: where process 0 writes.")
_ROLE_PLAN = flags.DEFINE_string("role_plan", "", "Internal: the plan of --role=mp_plan.")


def parse_plan(spec: str) -> dict:
  parts = spec.split(":")
  d, t, p = (int(x) for x in parts[0].split("x"))
  schedule = parts[1] if len(parts) > 1 else "1f1b"
  micro = int(parts[2]) if len(parts) > 2 else (1 if p == 1 else 2 * p)
  return dict(spec=spec, data=d, tensor=t, pipe=p, schedule=schedule, microbatches=micro)


def plan_config(base, plan):
  c = base.copy_and_resolve_references()
  c.mesh.update(data=plan["data"], tensor=plan["tensor"], pipe=plan["pipe"])
  c.pipeline.update(schedule=plan["schedule"], microbatches=plan["microbatches"], stage_layers=())
  c.eval.every_steps = 0
  return c


def time_plan(base, plan) -> dict:
  import jax
  from rec_llm.sim import measure
  from rec_llm.train import trainer
  n = plan["data"] * plan["tensor"] * plan["pipe"]
  run = trainer.build(plan_config(base, plan), jax.devices()[:n])  # all of them across processes
  timed = common.time_steps(run, _STEPS.value, _REPEATS.value)
  mem = measure.memory_of(next(iter(timed["step"].executables.values())))
  return {"step_time_s": timed["step_time_s"], "windows_s": timed["windows_s"],
          "compile_s": timed["compile_s"], "memory": mem, "processes": 1}


def _mp_env(i, port, n=2):
  env = dict(os.environ, REC_LLM_COORDINATOR=f"127.0.0.1:{port}", REC_LLM_NUM_PROCESSES=str(n),
             REC_LLM_PROCESS_ID=str(i), XLA_FLAGS="--xla_force_host_platform_device_count=4")
  return env


def _free_port():
  import socket
  s = socket.socket()
  s.bind(("127.0.0.1", 0))
  port = s.getsockname()[1]
  s.close()
  return port


def _run_two_processes(role_args, timeout=900):
  """Runs this script with `role_args` as 2 processes x 4 devices; process 0's JSON."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "out.json")
    port = _free_port()
    cmd = [sys.executable, "-m", "benchmarks.sim_calibration", f"--role_out={out}",
           f"--config={config_flags.get_config_filename(flags.FLAGS['config'])}"] + role_args
    procs = [subprocess.Popen(cmd, cwd=common.ROOT, env=_mp_env(i, port), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for i in range(2)]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    if any(p.returncode for p in procs) or not os.path.exists(out):
      raise RuntimeError(f"2-process run {role_args} failed:\n" + logs[0][-3000:])
    with open(out) as f:
      return json.load(f)


def mp_collectives() -> dict:
  """From 2 processes x 4 devices: cross-process collective fits, the all-devices model time
  and the step overhead."""
  return _run_two_processes(["--role=mp_collectives"])


def run_mp_collectives():
  """In each of the 2 processes: groups of 2 across the processes (4 at once), and all 8."""
  import jax
  from rec_llm.parallel import distributed
  from rec_llm.sim import measure
  distributed.initialize_from_env()
  devs = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  by_proc = np.asarray(devs).reshape(2, 4)
  grid = {2: by_proc.T, 8: by_proc.reshape(1, 8)}  # [4 groups, 2 processes], [1, all 8]
  fits = measure.collectives(devs, groups=(2, 8), level="inter", grid=grid, repeats=3)
  # Both processes computing at once on their 4 devices each, as the 1-process host check
  # does on 8: how much slower two processes share the machine's cores.
  model = {**_CONFIG.value.model.to_dict(), "num_items": int(_CONFIG.value.data.num_items)}
  both = measure.all_devices_time(model, 8, jax.local_devices())
  overhead = measure.step_overhead(devs)
  if jax.process_index() == 0:
    with open(_ROLE_OUT.value, "w") as f:
      json.dump({"collectives": fits, "all_devices_s": both, "step_overhead_s": overhead}, f)


def time_mp_plan(plan) -> dict:
  """`plan` timed as in this process, but as 2 processes x 4 devices (one JAX job through
  jax.distributed, the launch/local.sh recipe), `data` spanning the processes."""
  return _run_two_processes(["--role=mp_plan", f"--role_plan={plan['spec']}",
                             f"--steps={_STEPS.value}", f"--repeats={_REPEATS.value}"])


def run_mp_plan():
  import jax
  from rec_llm.parallel import distributed
  distributed.initialize_from_env()
  m = time_plan(_CONFIG.value, parse_plan(_ROLE_PLAN.value))
  m["processes"] = jax.process_count()
  if jax.process_index() == 0:
    with open(_ROLE_OUT.value, "w") as f:
      json.dump(m, f)


def predict(cal, base, plan, processes=1, corrections=None) -> dict:
  """The simulator's step for `plan` on this machine as `cal` describes it (`corrections`,
  when given, replace the calibration's fitted ones)."""
  import dataclasses
  from rec_llm.sim import cluster as cluster_lib
  from rec_llm.sim import cost_model, simulator
  n = plan["data"] * plan["tensor"] * plan["pipe"]
  c = cluster_lib.this_machine(cal, processes=processes, devices=n)
  if corrections is not None:
    c = dataclasses.replace(c, **cluster_lib.step_corrections(
        {"step_corrections": corrections}, processes))
  m = cost_model.ModelSpec.from_config(base)
  batch = simulator.Batch(int(base.train.batch_size), int(base.model.max_len))
  sp = simulator.Plan(data=plan["data"], tensor=plan["tensor"], pipe=plan["pipe"],
                      schedule=plan["schedule"], microbatches=plan["microbatches"])
  r = simulator.simulate(m, batch, c, sp)
  return {"step_time_s": r.step_s, "breakdown": r.breakdown, "memory": r.memory,
          "bubble": r.bubble, "dp_bytes": r.dp_bytes}


def spearman(a, b) -> float:
  ra = np.argsort(np.argsort(a)).astype(float)
  rb = np.argsort(np.argsort(b)).astype(float)
  return float(np.corrcoef(ra, rb)[0, 1])


def fit_corrections(cal, base, fit_rows: list[dict], verbose: bool = True) -> dict:
  from rec_llm.sim import calibrate
  pred = lambda corr, i: predict(cal, base, fit_rows[i]["plan"], fit_rows[i]["processes"],
                                 corr)["step_time_s"]
  names = list(calibrate.PARAMS)
  if (cal.get("components") or {}).get("busy"):  # host speed is measured with all devices busy
    names.remove("host_speedup")
  corr = calibrate.fit(pred, [m["step_time_s"] for m in fit_rows], names)
  corr["fit_plans"] = [f"{m['plan']['spec']} x{m['processes']}" for m in fit_rows]
  if verbose:
    print("fitted corrections:", corr, flush=True)
  return corr


def leave_one_out(cal, base, every: list[dict]) -> dict:
  """A second check, over every timed plan (fit and validation): each predicted by
  corrections fitted to all the others."""
  errs = []
  for i, m in enumerate(every):
    corr = fit_corrections(cal, base, every[:i] + every[i + 1:], verbose=False)
    p = predict(cal, base, m["plan"], m["processes"], corr)["step_time_s"]
    errs.append((p - m["step_time_s"]) / m["step_time_s"])
  meas = [m["step_time_s"] for m in every]
  out = {"plans": [f"{m['plan']['spec']} x{m['processes']}" for m in every], "rel_error": errs,
         "within_25pct": int(sum(abs(e) <= 0.25 for e in errs)), "max_abs_rel_error": max(map(abs, errs)),
         "spearman": spearman(meas, [t * (1 + e) for t, e in zip(meas, errs)])}
  print("leave-one-out over all %d plans: %d within 25%%, largest %.1f%%, Spearman %.2f" % (
      len(every), out["within_25pct"], 100 * out["max_abs_rel_error"], out["spearman"]), flush=True)
  return out


def report(cal, base, measured: list[dict], fit_rows: list[dict]) -> dict:
  for m in fit_rows:
    pred = predict(cal, base, m["plan"], m["processes"])
    print(f"fit {m['plan']['spec']:>12} x{m['processes']}: measured {m['step_time_s'] * 1e3:7.1f} "
          f"ms  fitted {pred['step_time_s'] * 1e3:7.1f} ms", flush=True)
  rows = []
  for m in measured:
    pred = predict(cal, base, m["plan"], m["processes"])
    err = (pred["step_time_s"] - m["step_time_s"]) / m["step_time_s"]
    rows.append({"plan": m["plan"]["spec"], "processes": m["processes"],
                 "measured_step_s": m["step_time_s"], "predicted_step_s": pred["step_time_s"],
                 "rel_error": err, "within_25pct": abs(err) <= 0.25, "measured": m,
                 "predicted": pred})
    print(f"{rows[-1]['plan']:>16} x{m['processes']}: measured {m['step_time_s'] * 1e3:7.1f} ms  "
          f"predicted {pred['step_time_s'] * 1e3:7.1f} ms  error {100 * err:+6.1f}%", flush=True)
  rho = spearman([r["measured_step_s"] for r in rows], [r["predicted_step_s"] for r in rows])
  summary = {"spearman": rho, "max_abs_rel_error": max([abs(r["rel_error"]) for r in rows] or [0]),
             "within_25pct": sum(r["within_25pct"] for r in rows), "plans": len(rows),
             "all_within_25pct": all(r["within_25pct"] for r in rows),
             "corrections": cal.get("step_corrections"),
             "target": "every validation plan within 25% and Spearman >= 0.8"}
  print(summary)
  loo = leave_one_out(cal, base, fit_rows + list(measured)) if fit_rows else None
  return {"fit_rows": fit_rows, "rows": rows, "summary": summary, "leave_one_out": loo}


def _save_partial(cal, fit_rows, measured):
  """Measurements so far, so a failure later loses nothing (--from_results reads it)."""
  with open(_OUT.value + ".partial", "w") as f:
    json.dump({"calibration": cal, "fit_rows": fit_rows,
               "rows": [{"measured": m} for m in measured]}, f)


def time_plans(base, specs, processes, into: list, save) -> None:
  """Times each plan (as `processes` processes), appending to `into` and saving as it goes."""
  for spec in specs:
    plan = parse_plan(spec)
    m = time_plan(base, plan) if processes == 1 else time_mp_plan(plan)
    m["plan"] = plan
    into.append(m)
    print(f"{spec:>16} x{processes}: {m['step_time_s'] * 1e3:7.1f} ms/step", flush=True)
    save()


def main(argv):
  del argv
  if _ROLE.value == "mp_collectives":
    return run_mp_collectives()
  if _ROLE.value == "mp_plan":
    return run_mp_plan()
  from rec_llm.sim import measure
  base = _CONFIG.value
  if _FROM.value:
    with open(_FROM.value) as f:
      old = json.load(f)
    cal = old["calibration"]
    fit_rows = old.get("fit_rows", [])
    measured = [r["measured"] for r in old["rows"]]
    if fit_rows:
      cal["step_corrections"] = fit_corrections(cal, base, fit_rows)
    common.write(_OUT.value, {"benchmark": "sim_calibration", "repredicted_from": _FROM.value,
                              "config": base.to_dict(), "calibration": cal,
                              **report(cal, base, measured, fit_rows)})
    return
  model = {**base.model.to_dict(), "num_items": int(base.data.num_items)}
  fit_rows, measured = [], []
  save = lambda: _save_partial(cal, fit_rows, measured)
  if _REUSE.value:
    from rec_llm.sim import cluster as cluster_lib
    cal = cluster_lib.load_calibration(_REUSE.value)
  else:
    t0 = time.perf_counter()
    cal = measure.calibrate(model)
    print(f"calibrated in {time.perf_counter() - t0:.0f}s: matmul {cal['matmul_flops'] / 1e9:.0f} "
          f"GFLOP/s, memory {cal['memory_bandwidth'] / 1e9:.1f} GB/s", flush=True)
    if _MP_PLANS.value or _MP_FIT_PLANS.value:
      mp = mp_collectives()
      cal["collectives"] += mp["collectives"]
      one = cal["host_speedup_measured"]["all_devices_s"]
      cal["multiprocess"] = {"processes": 2, "all_devices_s": mp["all_devices_s"],
                             "compute_scale": mp["all_devices_s"] / one,
                             "step_overhead_s": mp["step_overhead_s"]}
    time_plans(base, _FIT_PLANS.value, 1, fit_rows, save)
    time_plans(base, _MP_FIT_PLANS.value, 2, fit_rows, save)
    cal["step_corrections"] = fit_corrections(cal, base, fit_rows)
    cal["source"] = _CAL_OUT.value
    common.write(_CAL_OUT.value, {"calibration": cal})
  time_plans(base, _PLANS.value, 1, measured, save)
  time_plans(base, _MP_PLANS.value, 2, measured, save)
  common.write(_OUT.value, {"benchmark": "sim_calibration", "config": base.to_dict(),
                            "calibration": cal, **report(cal, base, measured, fit_rows)})
  if os.path.exists(_OUT.value + ".partial"):
    os.remove(_OUT.value + ".partial")


if __name__ == "__main__":
  app.run(main)
