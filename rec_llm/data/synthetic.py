"""Synthetic interaction sequences with power-law popularity and learnable structure.

Each item has a few fixed successors; a user's next item is one of the current item's
successors with probability `p_follow`, else a draw from a Zipf popularity law. A model
that learns the transitions beats popularity by a wide margin, so loss and hit rate
visibly improve.

Every number is a pure function of (seed, step, row, position) through a counter-based
hash, so a batch is the same whatever the mesh, the process count or which rows a
process builds.
"""

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
  """splitmix64 finaliser (wrapping uint64 arithmetic)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def _uniform(*keys) -> np.ndarray:
  """Uniform [0, 1) floats from broadcastable integer keys."""
  h = np.uint64(0)
  with np.errstate(over="ignore"):  # wrapping is the point
    for k in keys:
      h = _mix(np.asarray(k).astype(np.uint64) + h * _GOLDEN + _GOLDEN)
  return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


class SyntheticSequences:
  """Left-padded item sequences of length `seq_len` (ids 1..num_items, 0 = padding)."""

  def __init__(self, num_items: int, seq_len: int, seed: int = 0, zipf_a: float = 1.1,
               num_successors: int = 4, p_follow: float = 0.8, min_len: int | None = None):
    self.num_items, self.seq_len, self.seed = num_items, seq_len, seed
    self.p_follow = p_follow
    self.min_len = max(2, seq_len // 4) if min_len is None else min_len
    pop = 1.0 / np.arange(1, num_items + 1) ** zipf_a
    self.popularity_cdf = np.cumsum(pop / pop.sum())
    rng = np.random.default_rng(seed)
    # Successors follow popularity too, so the marginal stays power-law.
    self.successors = 1 + np.searchsorted(self.popularity_cdf,
                                          rng.random((num_items + 1, num_successors)))
    self.successors = np.minimum(self.successors, num_items)
    w = 0.5 ** np.arange(num_successors)
    self.successor_cdf = np.cumsum(w / w.sum())

  def _popular(self, u):
    return np.minimum(1 + np.searchsorted(self.popularity_cdf, u), self.num_items)

  def rows(self, step: int, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of the global batch for `step`: int32 [stop - start, seq_len]."""
    row = np.arange(start, stop, dtype=np.int64)[:, None]
    pos = np.arange(self.seq_len, dtype=np.int64)[None, :]
    u_follow = _uniform(self.seed, step, row, pos, 1)
    u_which = _uniform(self.seed, step, row, pos, 2)
    u_pop = _uniform(self.seed, step, row, pos, 3)
    out = np.empty((stop - start, self.seq_len), np.int64)
    out[:, 0] = self._popular(u_pop[:, 0])
    which = np.minimum(np.searchsorted(self.successor_cdf, u_which), self.successors.shape[1] - 1)
    for t in range(1, self.seq_len):
      follow = self.successors[out[:, t - 1], which[:, t]]
      out[:, t] = np.where(u_follow[:, t] < self.p_follow, follow, self._popular(u_pop[:, t]))
    lengths = self.min_len + (_uniform(self.seed, step, row[:, 0], 4)
                              * (self.seq_len - self.min_len + 1)).astype(np.int64)
    # Keep the last `length` items of each walk, left-padded with 0.
    keep = pos >= (self.seq_len - lengths[:, None])
    return np.where(keep, out, 0).astype(np.int32)
