"""Metrics to `metrics.jsonl` (one JSON object per line) and TensorBoard event files.

TensorBoard's own event writer is used directly (it needs no TensorFlow). Only
process 0 writes.
"""

import json
import numbers
import os
import time

import jax


class MetricWriter:

  def __init__(self, workdir: str | None):
    self.active = bool(workdir) and jax.process_index() == 0
    if not self.active:
      return
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter
    self._event, self._summary = event_pb2.Event, summary_pb2.Summary
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
    self._tb = EventFileWriter(os.path.join(workdir, "tensorboard"))

  def write(self, record: dict) -> None:
    if not self.active:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    values = [self._summary.Value(tag=k, simple_value=float(v)) for k, v in record.items()
              if k != "step" and isinstance(v, numbers.Number) and not isinstance(v, bool)]
    self._tb.add_event(self._event(wall_time=time.time(), step=int(record["step"]),
                                   summary=self._summary(value=values)))
    self._tb.flush()

  def close(self) -> None:
    if self.active:
      self._jsonl.close()
      self._tb.close()
