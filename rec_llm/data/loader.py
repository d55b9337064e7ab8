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
  row_lengths: tuple[int, ...]

  def rows(self, step: int, start: int, stop: int) -> np.ndarray: ...

  def row_len(self, step: int) -> int: ...


class BatchMaker:
  """Makes {'inputs', 'targets'} global arrays [batch, width], sharded ('batch', 'seq').

  width = the source's row length for the step, minus one (inputs and shifted targets).
  """

  def __init__(self, source: SequenceSource, batch_size: int, mesh: Mesh):
    self.source, self.batch_size = source, batch_size
    self.sharding = sharding.named(mesh, ("batch", "seq"))
    self.widths = tuple(n - 1 for n in source.row_lengths)
    # Devices that share rows (tensor/pipe replicas) reuse one build.
    self._rows = functools.lru_cache(maxsize=64)(source.rows)

  def spec(self, width: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The abstract batch of one width, for ahead-of-time compilation."""
    s = jax.ShapeDtypeStruct((self.batch_size, width), np.int32, sharding=self.sharding)
    return {"inputs": s, "targets": s}

  def __call__(self, step: int) -> dict[str, jax.Array]:
    shape = (self.batch_size, self.source.row_len(step) - 1)

    def part(offset):
      def cb(index):
        rows = index[0]
        r = self._rows(step, rows.start or 0, self.batch_size if rows.stop is None else rows.stop)
        return r[:, offset: offset + shape[1]]
      return jax.make_array_from_callback(shape, self.sharding, cb)
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
