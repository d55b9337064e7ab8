"""Leave-one-out split (SASRec, HSTU) and the training windows drawn from it.

For a user with n >= 3 interactions: the last item is the test target, the one before it
the validation target, the first n - 2 are training history. Users with fewer than 3
interactions only train.
"""

import dataclasses
import functools

import numpy as np

from rec_llm.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class LeaveOneOut:
  train: list[np.ndarray]    # per user: the training history
  eval_users: np.ndarray     # users with a validation and a test target
  num_items: int
  full: list[np.ndarray]     # per user: the whole history (for sampled negatives)

  def eval_examples(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    """(histories, targets) for 'val' (history = train) or 'test' (history = train + val)."""
    if split not in ("val", "test"):
      raise ValueError(f"unknown eval split {split!r}; use 'val' or 'test'")
    cut = 2 if split == "val" else 1
    hist = [self.full[u][:-cut] for u in self.eval_users]
    targets = np.array([self.full[u][-cut] for u in self.eval_users], np.int32)
    return hist, targets


def leave_one_out(sequences: list[np.ndarray], num_items: int) -> LeaveOneOut:
  lens = np.array([len(s) for s in sequences])
  eval_users = np.flatnonzero(lens >= 3)
  train = [s[:-2] if len(s) >= 3 else s for s in sequences]
  return LeaveOneOut(train=train, eval_users=eval_users, num_items=num_items, full=list(sequences))


def left_pad(seqs: list[np.ndarray], length: int) -> np.ndarray:
  """The last `length` items of each sequence, left-padded with 0: int32 [len(seqs), length]."""
  out = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    s = s[-length:]
    if len(s):
      out[i, length - len(s):] = s
  return out


class TrainWindows:
  """Training rows for the loader: each user's last `seq_len` training items, once per epoch.

  Every epoch visits the users in a seeded order; a step's rows are a pure function of
  (seed, step, row), so resuming at a step resumes the data exactly.

  With `buckets` (row lengths, ascending, the last = seq_len) an epoch sorts its users by
  length (random tie-breaks), cuts them into batches, shuffles the batches, and each batch
  is only as wide as the smallest bucket that holds its longest row: no compute on padding
  beyond the bucket. An epoch then drops `users % batch_size` random users (different ones
  each epoch) so every batch is full.
  """

  def __init__(self, train: list[np.ndarray], num_items: int, seq_len: int, batch_size: int,
               seed: int = 0, buckets: tuple[int, ...] = ()):
    self.users = np.array([u for u, s in enumerate(train) if len(s) >= 2], np.int64)
    self.train, self.num_items = train, num_items
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed
    self.lengths = np.array([min(len(train[u]), seq_len) for u in self.users])
    self.buckets = tuple(sorted(set(buckets) | {seq_len})) if buckets else (seq_len,)
    if self.buckets[-1] != seq_len:
      raise ConfigError(f"length buckets {list(buckets)} exceed the window {seq_len}")
    if buckets and len(self.users) < batch_size:
      raise ConfigError(f"{len(self.users)} training users cannot fill a batch of {batch_size} "
                        "with length buckets; lower train.batch_size")

  @property
  def steps_per_epoch(self) -> float:
    if len(self.buckets) > 1:
      return float(len(self.users) // self.batch_size)
    return len(self.users) / self.batch_size

  @functools.lru_cache(maxsize=4)
  def _epoch(self, epoch: int) -> np.ndarray:
    """The epoch's user order (positions into self.users)."""
    rng = np.random.default_rng([self.seed, epoch])
    if len(self.buckets) == 1:
      return rng.permutation(len(self.users))
    nb = len(self.users) // self.batch_size
    keep = rng.permutation(len(self.users))[: nb * self.batch_size]
    keep = keep[np.lexsort((rng.random(len(keep)), self.lengths[keep]))]  # by length
    batches = keep.reshape(nb, self.batch_size)[rng.permutation(nb)]
    return batches.reshape(-1)

  def _positions(self, step: int, start: int, stop: int) -> np.ndarray:
    i = step * self.batch_size + np.arange(start, stop)
    per_epoch = len(self._epoch(0))
    out = np.empty(len(i), np.int64)
    for epoch in np.unique(i // per_epoch):
      sel = i // per_epoch == epoch
      out[sel] = self._epoch(int(epoch))[i[sel] % per_epoch]
    return out

  def row_len(self, step: int) -> int:
    """The width of step's rows: the smallest bucket holding its longest window."""
    if len(self.buckets) == 1:
      return self.seq_len
    longest = self.lengths[self._positions(step, 0, self.batch_size)].max()
    return next(b for b in self.buckets if b >= longest)

  def rows(self, step: int, start: int, stop: int) -> np.ndarray:
    users = self.users[self._positions(step, start, stop)]
    return left_pad([self.train[u] for u in users], self.row_len(step))
