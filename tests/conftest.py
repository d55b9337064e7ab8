"""Test set-up: 8 virtual CPU devices, created before JAX starts, and fast compiles.

Tests compile hundreds of small programs and run each a few times, so compile time is most
of the suite: they compile with LLVM's optimisation off (`TEST_XLA_FLAGS`, about 40% faster
compiles; the same HLO, so the same computation, in other machine code). Tolerances are
error bounds that hold for any code generation (tests/numerics.py), and
`python -m benchmarks.numerics_shakeout` runs the numerical tests at the default level and
under other XLA CPU settings too. A level given in XLA_FLAGS wins. Subprocesses (trainer
runs) get the same flags through `SUBPROCESS_XLA_FLAGS`, without the device count.
"""

import os
import re
import sys

# (Without any device count: pytest-xdist workers inherit the controller's environment,
# which this file already changed once.)
_USER_FLAGS = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                     os.environ.get("XLA_FLAGS", "")).strip()
TEST_XLA_FLAGS = ("" if "xla_backend_optimization_level" in _USER_FLAGS
                  else "--xla_backend_optimization_level=0")
# XLA:CPU aborts the process when a device thread has not reached a collective within 40 s
# (the default); with 8 virtual devices on 2 busy cores a slow thread is not a hang (seen
# once in CI: "Fatal Python error: Aborted" in a local-SGD step). Wait up to 10 minutes.
if "xla_cpu_collective_call_terminate_timeout_seconds" not in _USER_FLAGS:
  TEST_XLA_FLAGS += " --xla_cpu_collective_call_terminate_timeout_seconds=600"
SUBPROCESS_XLA_FLAGS = f"{_USER_FLAGS} {TEST_XLA_FLAGS}".strip()
os.environ["XLA_FLAGS"] = f"{SUBPROCESS_XLA_FLAGS} --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
