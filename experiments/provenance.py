"""Where a result came from: command, git commit, JAX version, devices, time."""

import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit() -> tuple[str, bool | None]:
  """(HEAD commit, whether tracked files differ from it); ('unknown', None) outside git."""
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                cwd=ROOT, capture_output=True, text=True).stdout.strip())
  except (OSError, subprocess.CalledProcessError):
    return "unknown", None
  return commit, dirty


def command() -> str:
  """The command line as `python -m MODULE ARGS` when run as a module of this repository."""
  script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
  module = script[:-3].replace(os.sep, ".") if script.endswith(".py") else script
  return " ".join(["python", "-m", module] + sys.argv[1:])


def provenance() -> dict:
  import jax  # here, so modules that only plan never start a backend by importing this
  commit, dirty = git_commit()
  dev = jax.devices()[0]
  return {"command": command(), "git_commit": commit, "git_dirty": dirty,
          "jax_version": jax.__version__, "device_kind": dev.device_kind,
          "platform": dev.platform, "num_devices": jax.device_count(), "host": platform.node(),
          "cpu_count": os.cpu_count(), "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
