r"""Run the benchmarks into JSON, all of them or the ones named.

  python -m benchmarks.run_all [--only=step_time,pipeline] [--skip=compression] \
      [--out_dir=benchmarks/results] [--extra=compression:--data=../shared/data/sasrec/ml-1m.txt] [--list]

Each benchmark runs in its own process (each sets XLA flags at import and parses its own
flags), one after another, writing OUT_DIR/NAME.json; OUT_DIR/run_all.json records every
command, exit code and wall time with provenance. A failing benchmark does not stop the
others; the exit code is 1 if any failed. `--list` prints the commands and exits.

Rough wall times on the 2-core CPU machine: step_time and pipeline a few minutes each;
sim_calibration tens of minutes (microbenchmarks, 10 plans, 2-process runs); compression
about 5 minutes per point, 9 points (needs ML-1M: --extra=compression:--data=PATH);
numerics_shakeout about 4 minutes per XLA setting, 6 settings; published about 2 minutes
(arithmetic only); adaptive_balance about 6 minutes; dp_methods about 5 minutes per run,
13 points x 3 seeds (needs ML-1M: --extra=dp_methods:--data=PATH). gpu_1b
needs a GPU (under 8 minutes on one H100): without one it is skipped unless named in --only.
"""

import os
import subprocess
import sys
import time

from absl import app, flags

# name: (module, extra default args, needs a GPU)
BENCHMARKS = {
    "step_time": ("benchmarks.step_time", [], False),
    "pipeline": ("benchmarks.pipeline", [], False),
    "memory": ("benchmarks.memory", [], False),
    "compression": ("benchmarks.compression", [], False),
    "sim_calibration": ("benchmarks.sim_calibration",
                        ["--calibration_out={out_dir}/this_machine_calibration.json"], False),
    "gpu_1b": ("benchmarks.gpu_1b", [], True),
    "numerics_shakeout": ("benchmarks.numerics_shakeout", [], False),
    "published": ("benchmarks.published", [], False),
    "adaptive_balance": ("benchmarks.adaptive_balance", [], False),
    "dp_methods": ("benchmarks.dp_methods", [], False),
}

_ONLY = flags.DEFINE_list("only", None, f"Run only these, in this order ({', '.join(BENCHMARKS)}).")
_SKIP = flags.DEFINE_list("skip", [], "Benchmarks to leave out.")
_OUT_DIR = flags.DEFINE_string("out_dir", "benchmarks/results", "Where NAME.json files go.")
_EXTRA = flags.DEFINE_multi_string("extra", [], "NAME:--flag=value passed to one benchmark "
                                   "(repeatable).")
_TIMEOUT = flags.DEFINE_integer("timeout_s", 0, "Stop a benchmark after this long (0: never).")
_LIST = flags.DEFINE_bool("list", False, "Print the commands and exit.")


def _fail(msg: str):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(2)


def has_gpu() -> bool:
  import jax
  return jax.devices()[0].platform == "gpu"


def plan() -> list[tuple[str, str, list[str]]]:
  """(name, output path, command) per benchmark to run; exits 2 on unknown names or bad --extra."""
  names = _ONLY.value or list(BENCHMARKS)
  unknown = [n for n in names + _SKIP.value if n not in BENCHMARKS]
  if unknown:
    _fail(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
  extra = {}
  for e in _EXTRA.value:
    name, sep, arg = e.partition(":")
    if not sep or name not in BENCHMARKS or not arg.startswith("--"):
      _fail(f"--extra={e!r} must look like NAME:--flag=value with NAME one of {list(BENCHMARKS)}")
    extra.setdefault(name, []).append(arg)
  out = []
  for name in names:
    if name in _SKIP.value:
      continue
    module, args, _ = BENCHMARKS[name]
    path = os.path.join(_OUT_DIR.value, f"{name}.json")
    args = [a.format(out_dir=_OUT_DIR.value) for a in args]
    cmd = [sys.executable, "-m", module, f"--out={path}"] + args + extra.get(name, [])
    out.append((name, path, cmd))
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  todo = plan()
  if _LIST.value:
    for name, _, cmd in todo:
      print(name + ": " + " ".join(["python"] + cmd[1:]))
    return
  gpu = has_gpu() if any(BENCHMARKS[n][2] for n, _, _ in todo) else False
  from benchmarks import common
  summary = []
  for name, path, cmd in todo:
    if BENCHMARKS[name][2] and not gpu and not _ONLY.value:
      summary.append({"name": name, "skipped": "needs a GPU; none here"})
      print(f"== {name}: skipped (needs a GPU)", flush=True)
      continue
    print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
    t = time.perf_counter()
    try:
      rc = subprocess.run(cmd, cwd=common.ROOT, timeout=_TIMEOUT.value or None).returncode
    except subprocess.TimeoutExpired:
      rc = "timeout"
    wall = time.perf_counter() - t
    summary.append({"name": name, "command": " ".join(["python"] + cmd[1:]), "returncode": rc,
                    "wall_s": wall, "output": path})
    print(f"== {name}: exit {rc} after {wall:.0f}s", flush=True)
  common.write(os.path.join(_OUT_DIR.value, "run_all.json"), {"benchmarks": summary})
  failed = [s["name"] for s in summary if s.get("returncode") not in (None, 0)]
  if failed:
    print(f"failed: {', '.join(failed)}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
