"""Global batches built shard by shard, and a background prefetcher.

`jax.make_array_from_callback` asks each process only for the rows its own devices hold,
so no process builds (or even sees) the whole global batch.
"""

import functools
import queue
import threading
from typing import Iterator, Protocol

import jax
import numpy as np
from jax.sharding import Mesh

from rec_llm.parallel import sharding


class SequenceSource(Protocol):
  seq_len: int

  def rows(self, step: int, start: int, stop: int) -> np.ndarray: ...


class BatchMaker:
  """Makes {'inputs', 'targets'} global arrays [batch, seq_len - 1], sharded ('batch', 'seq')."""

  def __init__(self, source: SequenceSource, batch_size: int, mesh: Mesh):
    self.source, self.batch_size = source, batch_size
    self.sharding = sharding.named(mesh, ("batch", "seq"))
    self.shape = (batch_size, source.seq_len - 1)
    # Devices that share rows (tensor/pipe replicas) reuse one build.
    self._rows = functools.lru_cache(maxsize=64)(source.rows)

  def __call__(self, step: int) -> dict[str, jax.Array]:
    def part(offset):
      def cb(index):
        rows = index[0]
        r = self._rows(step, rows.start or 0, self.batch_size if rows.stop is None else rows.stop)
        return r[:, offset: offset + self.shape[1]]
      return jax.make_array_from_callback(self.shape, self.sharding, cb)
    return {"inputs": part(0), "targets": part(1)}


def prefetch(make_batch, first_step: int, last_step: int, depth: int = 2) -> Iterator:
  """Yields (step, batch) for steps [first_step, last_step), built `depth` steps ahead."""
  q: queue.Queue = queue.Queue(maxsize=depth)
  stop = threading.Event()

  def work():
    try:
      for step in range(first_step, last_step):
        item = (step, make_batch(step))
        while not stop.is_set():
          try:
            q.put(item, timeout=0.1)
            break
          except queue.Full:
            pass
        if stop.is_set():
          return
    except BaseException as e:  # surfaced in the consumer, never swallowed
      q.put(e)

  thread = threading.Thread(target=work, daemon=True, name="prefetch")
  thread.start()
  try:
    for _ in range(first_step, last_step):
      item = q.get()
      if isinstance(item, BaseException):
        raise item
      yield item
  finally:
    stop.set()
