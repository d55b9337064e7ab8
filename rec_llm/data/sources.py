"""Data sources picked by `config.data.name`.

A source gives training rows for the loader (`rows(step, start, stop)`, left-padded
[rows, seq_len] item ids, a pure function of the step) and held-out examples for
evaluation (`eval_examples(split)` -> per-user histories and target items).
"""

import dataclasses

import jax
import numpy as np
from jax.experimental import multihost_utils
from ml_collections import ConfigDict

from rec_llm.data import split as split_lib
from rec_llm.data.synthetic import SyntheticSequences
from rec_llm.errors import ConfigError

MOVIELENS = ("ml-1m", "ml-100k", "ml-20m", "ml-25m", "sasrec")
SOURCES = ("synthetic",) + MOVIELENS
_EVAL_STEP = {"val": 2**40, "test": 2**40 + 1}  # synthetic held-out rows: steps never trained on
_COUNT_STEP, _COUNT_ROWS = 2**40 + 2, 4096  # synthetic rows whose items estimate popularity


@dataclasses.dataclass
class Source:
  name: str
  num_items: int
  seq_len: int
  rows_fn: object
  eval_fn: object
  steps_per_epoch: float | None = None
  row_len_fn: object = None  # step -> row width (length buckets); None: always seq_len
  row_lengths: tuple[int, ...] = ()  # every width row_len_fn can return
  item_counts: np.ndarray | None = None  # [num_items + 1] training frequency (popularity sampler)

  def __post_init__(self):
    self.row_lengths = tuple(self.row_lengths) or (self.seq_len,)

  def rows(self, step: int, start: int, stop: int) -> np.ndarray:
    return self.rows_fn(step, start, stop)

  def row_len(self, step: int) -> int:
    return self.seq_len if self.row_len_fn is None else self.row_len_fn(step)

  def eval_examples(self, split: str) -> tuple[list[np.ndarray], np.ndarray]:
    return self.eval_fn(split)


def check_name(name: str) -> None:
  if name not in SOURCES:
    raise ConfigError(f"unknown data.name={name!r}; choose one of {list(SOURCES)}")


def make_source(data_cfg: ConfigDict, seq_len: int, batch_size: int, seed: int) -> Source:
  """A source of left-padded rows of `seq_len` items (the inputs plus the shifted target)."""
  check_name(data_cfg.name)
  if data_cfg.name == "synthetic":
    syn = SyntheticSequences(int(data_cfg.num_items), seq_len, seed=seed,
                             zipf_a=float(data_cfg.zipf_a), p_follow=float(data_cfg.p_follow))
    n_eval = int(data_cfg.eval_users)

    def synthetic_eval(split):
      rows = syn.rows(_EVAL_STEP[split], 0, n_eval)
      return [r[r > 0][:-1] for r in rows], rows[:, -1].copy()
    counts = np.bincount(syn.rows(_COUNT_STEP, 0, _COUNT_ROWS).reshape(-1),
                         minlength=syn.num_items + 1)
    counts[0] = 0
    return Source("synthetic", syn.num_items, seq_len, syn.rows, synthetic_eval,
                  item_counts=counts)

  from rec_llm.data import movielens  # the TFDS stack loads only for real data
  path = data_cfg.path
  if not path:
    raise ConfigError(f"data.name={data_cfg.name!r} needs data.path: the raw MovieLens directory, "
                      "ratings file or GroupLens zip (https://grouplens.org/datasets/movielens/)")
  load = lambda: movielens.load(path, data_cfg.name, data_cfg.data_dir or None)
  if jax.process_count() > 1:  # one process prepares the cache; the others then read it
    if jax.process_index() == 0:
      load()
    multihost_utils.sync_global_devices("rec_llm:data_prepared")
  hist = load()
  loo = split_lib.leave_one_out(hist.sequences, hist.num_items)
  buckets = tuple(int(b) + 1 for b in data_cfg.length_buckets)  # + the target
  if any(b < 3 or b > seq_len for b in buckets):
    raise ConfigError(f"data.length_buckets={list(data_cfg.length_buckets)} must lie in "
                      f"[2, model.max_len={seq_len - 1}]")
  windows = split_lib.TrainWindows(loo.train, hist.num_items, seq_len, batch_size, seed, buckets)
  return Source(data_cfg.name, hist.num_items, seq_len, windows.rows, loo.eval_examples,
                steps_per_epoch=windows.steps_per_epoch, row_len_fn=windows.row_len,
                row_lengths=windows.buckets,
                item_counts=np.bincount(np.concatenate(loo.train), minlength=hist.num_items + 1))
