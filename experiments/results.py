"""results.jsonl: one JSON object per line, appended as points finish; the last row per key wins."""

import json
import os

from absl import logging

DONE = ("ok", "infeasible")  # statuses a re-run skips; 'error' rows are retried


def read(path: str) -> list[dict]:
  """Every parsable row of a results.jsonl (a line cut short by a crash is skipped)."""
  if os.path.isdir(path):
    path = os.path.join(path, "results.jsonl")
  rows, bad = [], 0
  if not os.path.exists(path):
    return rows
  with open(path) as f:
    for line in f:
      if not line.strip():
        continue
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        bad += 1
  if bad:
    logging.warning("%s: skipped %d unreadable line(s)", path, bad)
  return rows


def latest(rows: list[dict]) -> list[dict]:
  """The last row of each key, in first-seen order."""
  by_key = {}
  for r in rows:
    by_key[r["key"]] = r  # a dict keeps the first-seen order, with the latest value
  return list(by_key.values())


def append(path: str, row: dict) -> None:
  with open(path, "a") as f:
    f.write(json.dumps(row, sort_keys=True) + "\n")
    f.flush()
    os.fsync(f.fileno())
