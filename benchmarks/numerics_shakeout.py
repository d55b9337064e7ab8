r"""Shake out CPU-dependent numerics: the numerical tests under other XLA CPU code generation.

  python -m benchmarks.numerics_shakeout [--variants=default,sse4_2,avx2,o0,ynn_dot,fast_math] \
      [--tests=tests/test_compression.py,...] [--out=benchmarks/results/numerics_shakeout.json]

Another CPU orders float32 sums differently from this one: wider or narrower vectors, other
matmul kernels (oneDNN, XNNPACK, AMX tiles), other thread counts. A tolerance that holds
only for this machine's order fails there. This runs the tests whose tolerances are error
bounds (tests/numerics.py) once per XLA CPU setting below, each of which changes how the
same programs are compiled (vector width, instruction set, kernels, optimisation), and
records for every check how close its error came to its bound (`ratio`, <= 1 passes).
A ratio near 1 on any variant means the bound is about to fail on some machine.

Variants (XLA_FLAGS added to the 8 virtual devices; all but `o0` at XLA's default
optimisation level 2, what users run):
  default    this machine's native code
  sse4_2     --xla_cpu_max_isa=SSE4_2: 128-bit vectors, no FMA
  avx2       --xla_cpu_max_isa=AVX2: 256-bit vectors
  o0         --xla_backend_optimization_level=0: no LLVM optimisation, what the test suite
             compiles with for speed (tests/conftest.py)
  ynn_dot    --xla_cpu_experimental_ynn_fusion_type=dot: another matmul library
  fast_math  --xla_cpu_enable_fast_math=true: reassociation and approximate exp/log allowed;
             a stress test beyond IEEE arithmetic (a failure here is information, not a bug)

Each variant runs `pytest -n 2 --dist loadfile`; about 4 minutes a variant on the 2-core
machine with the default tests.
"""

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

from benchmarks import common

O2 = "--xla_backend_optimization_level=2"
VARIANTS = {
    "default": O2,
    "sse4_2": f"{O2} --xla_cpu_max_isa=SSE4_2",
    "avx2": f"{O2} --xla_cpu_max_isa=AVX2",
    "o0": "--xla_backend_optimization_level=0",
    "ynn_dot": f"{O2} --xla_cpu_experimental_ynn_fusion_type=dot",
    "fast_math": f"{O2} --xla_cpu_enable_fast_math=true",
}
TESTS = ["tests/test_compression.py", "tests/test_equivalence.py", "tests/test_pipeline.py",
         "tests/test_dp.py", "tests/test_model.py", "tests/test_eval.py"]

_VARIANTS = flags.DEFINE_list("variants", list(VARIANTS), f"Any of {list(VARIANTS)}.")
_TESTS = flags.DEFINE_list("tests", TESTS, "Test files (or node ids) to run.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/numerics_shakeout.json", "Output JSON.")


def run_variant(name: str, tests: list[str]) -> dict:
  with tempfile.TemporaryDirectory() as tmp:
    report = os.path.join(tmp, "report.jsonl")
    env = dict(os.environ, REC_LLM_NUMERICS_REPORT=report,
               XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") + " " + VARIANTS[name]).strip())
    t = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadfile",
                        "-p", "no:cacheprovider", *tests], cwd=common.ROOT, env=env,
                       capture_output=True, text=True)
    wall = time.perf_counter() - t
    checks = [json.loads(l) for l in open(report)] if os.path.exists(report) else []
  summary = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else p.stderr[-500:]
  failed = [l.split(" ", 1)[1] for l in p.stdout.splitlines() if l.startswith("FAILED ")]
  worst = sorted(checks, key=lambda c: -c["ratio"])[:10]
  by_test = {}  # the worst ratio of each test function (parameters folded in)
  for c in checks:
    name = c["test"].split("[")[0]
    by_test[name] = max(by_test.get(name, 0.0), c["ratio"])
  print(f"{name:10s} {summary} | {len(checks)} checks, worst ratio "
        f"{worst[0]['ratio'] if worst else float('nan'):.3f} | {wall:.0f}s", flush=True)
  return {"variant": name, "xla_flags": VARIANTS[name], "returncode": p.returncode,
          "summary": summary, "failed": failed, "wall_s": wall, "checks": len(checks),
          "worst": worst, "worst_by_test": dict(sorted(by_test.items(), key=lambda kv: -kv[1]))}


def main(argv):
  del argv
  unknown = set(_VARIANTS.value) - set(VARIANTS)
  if unknown:
    print(f"error: unknown variant(s) {sorted(unknown)}; choose from {list(VARIANTS)}",
          file=sys.stderr)
    sys.exit(2)
  results = [run_variant(v, _TESTS.value) for v in _VARIANTS.value]
  common.write(_OUT.value, {"tests": _TESTS.value, "variants": results})
  if any(r["returncode"] for r in results if r["variant"] != "fast_math"):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
