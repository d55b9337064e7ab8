r"""Run a sweep: every point of a sweep config, measured here and/or simulated on cluster presets.

  python -m experiments.sweep --config=experiments/configs/sweeps/paper_strategies.py --workdir=/tmp/paper
  python -m experiments.sweep --config=experiments/configs/sweeps/local_small.py --workdir=/tmp/local

Each finished point appends one JSON object to WORKDIR/results.jsonl: the point (its axes),
its key (a hash of the point), `source` ('measured' | 'simulated'), `status` ('ok',
'infeasible' with a `reason`, or 'error'), the cluster preset, mesh, step time, tokens/s,
MFU, memory, the simulator's breakdown or the measured step times and quality metrics, the
run config as a dict, and provenance (command, git commit, JAX version, device kind).
Simulated points also write their step's Chrome trace to WORKDIR/traces/KEY.json.
Running the same command again skips points already in results.jsonl (retrying 'error'
rows). `--list` prints the points and exits. Bad input ends with one `error:` line, exit 2.
"""

import os
import sys
import time

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a sweep config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for results.jsonl and traces/.")
_LIST = flags.DEFINE_bool("list", False, "Print the points (key, group, axes) and exit.")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", 8, "Virtual CPU devices for measured points when XLA_FLAGS sets no count.")


def describe(p: dict) -> str:
  parts = [p["group"], p["source"], p["cluster"] or "local",
           f"{p['devices']}dev" if p["devices"] else None, p["mesh"],
           f"{p['rows_per_device']}rows/dev" if p["rows_per_device"] else None,
           p["schedule"], f"mb{p['microbatches']}" if p["microbatches"] else None,
           p["compression"] if p["compression"] != "none" else None,
           p["dp_mode"] if p["dp_mode"] != "sync" else None]
  return " ".join(str(x) for x in parts if x)


def validate(pts: list[dict]) -> None:
  """Every point's run config and cluster, before anything runs (ConfigError on bad input)."""
  from experiments import measured, simulated
  from rec_llm.errors import ConfigError
  for i, p in enumerate(pts):
    try:
      (simulated.setup if p["source"] == "simulated" else measured.setup)(p)
    except ConfigError as e:
      raise ConfigError(f"point {i + 1} ({describe(p)}): {e}") from None


def run_point(p: dict, workdir: str) -> dict:
  from experiments import measured, simulated
  if p["source"] == "measured":
    return measured.run(p)
  row = simulated.run(p)
  if row["status"] == "ok" and p["trace"]:
    import json
    os.makedirs(os.path.join(workdir, "traces"), exist_ok=True)
    rel = os.path.join("traces", p["key"] + ".json")
    with open(os.path.join(workdir, rel), "w") as f:
      json.dump(simulated.chrome_trace(p, row["plan"]), f)
    row["trace"] = rel
  return row


def sweep(config, workdir: str) -> dict:
  """Runs the points not yet in workdir/results.jsonl; returns counts."""
  from experiments import points as points_lib
  from experiments import provenance, results
  pts = points_lib.expand(config)
  validate(pts)
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, "results.jsonl")
  done = {r["key"] for r in results.latest(results.read(path)) if r.get("status") in results.DONE}
  todo = [p for p in pts if p["key"] not in done]
  logging.info("sweep %r: %d points, %d already in %s, %d to run", config.get("name", "sweep"),
               len(pts), len(pts) - len(todo), path, len(todo))
  prov = provenance.provenance()
  counts = {"points": len(pts), "skipped": len(pts) - len(todo), "ok": 0, "infeasible": 0, "error": 0}
  spent = {"measured": [], "simulated": []}  # seconds per finished point, for the ETA
  for i, p in enumerate(todo, 1):
    t = time.perf_counter()
    try:
      row = run_point(p, workdir)
    except Exception as e:  # one failing point must not lose the others; retried on re-run
      logging.exception("point %s failed", p["key"])
      row = {"status": "error", "reason": f"{type(e).__name__}: {e}"}
    point = {k: v for k, v in p.items() if k != "key"}
    row = {**row, "key": p["key"], "sweep": p["sweep"], "group": p["group"],
           "source": p["source"], "point": point, "seconds": time.perf_counter() - t,
           "provenance": {**prov, "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}}
    row.setdefault("cluster", p["cluster"])
    results.append(path, row)
    counts[row["status"]] += 1
    spent[p["source"]].append(row["seconds"])
    mean = lambda src: (sum(spent[src]) / len(spent[src]) if spent[src] else
                        max(sum(spent.values(), [])))
    eta = sum(mean(q["source"]) for q in todo[i:])
    summary = (f"{row.get('mesh', p['mesh'])} {row['tokens_per_s']:,.0f} tok/s MFU "
               f"{100 * row['mfu']:.1f}%" if row["status"] == "ok" else
               f"{row['status']}: {row.get('reason', '')[:100]}")
    logging.info("[%d/%d] %s -> %s | %.1fs | ETA %ds", i, len(todo), describe(p), summary,
                 row["seconds"], eta)
  return counts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = cli.load_config(_CONFIG, "experiments/configs/sweeps/local_small.py")
  if not _WORKDIR.value and not _LIST.value:
    cli.fail("--workdir is required: results go to WORKDIR/results.jsonl")
  from experiments import points as points_lib
  from rec_llm.errors import ConfigError
  try:
    pts = points_lib.expand(config)  # plain Python: bad configs fail before JAX starts
    if _LIST.value:
      for p in pts:
        print(p["key"], describe(p))
      return
    if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
      import jax
      jax.config.update("jax_num_cpu_devices", _HOST_DEVICES.value)
    counts = sweep(config, _WORKDIR.value)
  except ConfigError as e:
    cli.fail(str(e))
  print(f"{counts['points']} points: {counts['skipped']} already done, {counts['ok']} ok, "
        f"{counts['infeasible']} infeasible, {counts['error']} failed; "
        f"{os.path.join(_WORKDIR.value, 'results.jsonl')}")
  if counts["error"]:
    sys.exit(1)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=cli.flags_parser("experiments.sweep"))
