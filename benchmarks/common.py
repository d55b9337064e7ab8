"""Provenance and output for benchmark JSON files."""

import json
import os

from experiments import provenance as provenance_lib

ROOT = provenance_lib.ROOT
provenance = provenance_lib.provenance  # command, git commit, jax version, device kind, ...


def write(path: str, result: dict) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump({"provenance": provenance(), **result}, f, indent=2)
  os.replace(path + ".tmp", path)  # never a half-written result
  print(f"wrote {path}")
