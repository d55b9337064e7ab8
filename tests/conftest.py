"""Test set-up: 8 virtual CPU devices, created before JAX starts, and a compilation cache."""

import os
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the trainer processes they start) compile the same programs: the init of
# one model on one mesh, the smoke config's step. A persistent cache per pytest worker (and
# user) lets every repeat load the executable instead of compiling it again; subprocesses
# inherit it through the environment. Keyed by XLA on the program, flags and versions.
_worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"rec_llm_test_jax_cache_{os.getuid()}_{_worker}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
