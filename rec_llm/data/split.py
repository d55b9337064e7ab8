"""Leave-one-out split (SASRec, HSTU) and the training windows drawn from it.

For a user with n >= 3 interactions: the last item is the test target, the one before it
the validation target, the first n - 2 are training history. Users with fewer than 3
interactions only train.
"""

import dataclasses
import functools

import numpy as np


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

  Global sample i = step * batch_size + row belongs to epoch i // users and is user
  perm_epoch[i % users], with a seeded permutation per epoch: a pure function of
  (seed, step, row), so resuming at a step resumes the data exactly.
  """

  def __init__(self, train: list[np.ndarray], num_items: int, seq_len: int, batch_size: int,
               seed: int = 0):
    self.users = [u for u, s in enumerate(train) if len(s) >= 2]  # needs an input and a target
    self.train, self.num_items = train, num_items
    self.seq_len, self.batch_size, self.seed = seq_len, batch_size, seed

  @property
  def steps_per_epoch(self) -> float:
    return len(self.users) / self.batch_size

  @functools.lru_cache(maxsize=4)
  def _perm(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self.seed, epoch]).permutation(len(self.users))

  def rows(self, step: int, start: int, stop: int) -> np.ndarray:
    seqs = []
    for r in range(start, stop):
      i = step * self.batch_size + r
      epoch, pos = divmod(i, len(self.users))
      seqs.append(self.train[self.users[self._perm(epoch)[pos]]])
    return left_pad(seqs, self.seq_len)
