"""Provenance and output for benchmark JSON files."""

import json
import os
import platform
import subprocess
import sys
import time

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def provenance() -> dict:
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True, check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True).stdout.strip())
  except (OSError, subprocess.CalledProcessError):
    commit, dirty = "unknown", None
  script = os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)
  module = script[:-3].replace(os.sep, ".") if script.endswith(".py") else script
  return {"command": " ".join(["python", "-m", module] + sys.argv[1:]),
          "git_commit": commit, "git_dirty": dirty, "jax_version": jax.__version__,
          "device_kind": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
          "num_devices": jax.device_count(), "host": platform.node(), "cpu_count": os.cpu_count(),
          "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def write(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"provenance": provenance(), **result}, f, indent=2)
  os.replace(path + ".tmp", path)  # never a half-written result
  print(f"wrote {path}")
