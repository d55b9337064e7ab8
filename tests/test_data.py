import numpy as np

from rec_llm.data.synthetic import SyntheticSequences


def test_rows_are_a_function_of_seed_step_and_row():
  src = SyntheticSequences(num_items=200, seq_len=20, seed=3)
  full = src.rows(step=5, start=0, stop=16)
  np.testing.assert_array_equal(src.rows(5, 4, 12), full[4:12])  # any shard split
  np.testing.assert_array_equal(SyntheticSequences(200, 20, seed=3).rows(5, 0, 16), full)
  assert not np.array_equal(src.rows(6, 0, 16), full)
  assert not np.array_equal(SyntheticSequences(200, 20, seed=4).rows(5, 0, 16), full)


def test_rows_are_left_padded_valid_ids():
  src = SyntheticSequences(num_items=200, seq_len=20, seed=0)
  r = src.rows(0, 0, 256)
  assert r.dtype == np.int32 and r.shape == (256, 20)
  assert r.min() >= 0 and r.max() <= 200
  lengths = (r != 0).sum(1)
  assert lengths.min() >= src.min_len and lengths.max() == 20
  for row, n in zip(r, lengths):  # padding only at the left
    assert (row[: 20 - n] == 0).all() and (row[20 - n:] != 0).all()


def test_popularity_is_power_law_and_transitions_are_learnable():
  src = SyntheticSequences(num_items=1000, seq_len=50, seed=0)
  r = src.rows(0, 0, 2000)
  counts = np.bincount(r[r > 0], minlength=1001)[1:]
  top = np.sort(counts)[::-1]
  assert top[0] > 20 * np.median(top)
  # The most common successor of an item is predictable well above its popularity share.
  prev, nxt = r[:, :-1].ravel(), r[:, 1:].ravel()
  keep = prev > 0
  hits = np.mean(src.successors[prev[keep], 0] == nxt[keep])
  assert hits > 0.3


def test_length_buckets_cover_each_epoch_once_and_only_trim_padding():
  from rec_llm.data.split import TrainWindows
  rng = np.random.default_rng(0)
  train = [rng.integers(1, 50, size=n) for n in rng.integers(2, 40, size=103)]
  plain = TrainWindows(train, 50, seq_len=33, batch_size=10, seed=1)
  bucketed = TrainWindows(train, 50, seq_len=33, batch_size=10, seed=1, buckets=(5, 9, 17))
  assert bucketed.buckets == (5, 9, 17, 33) and bucketed.steps_per_epoch == 10
  for epoch in range(2):
    seen, widths = [], set()
    for step in range(epoch * 10, epoch * 10 + 10):
      width = bucketed.row_len(step)
      rows = bucketed.rows(step, 0, 10)
      widths.add(width)
      assert rows.shape == (10, width)
      users = bucketed.users[bucketed._positions(step, 0, 10)]
      full = plain.rows(0, 0, 1).shape[1]
      from rec_llm.data.split import left_pad
      np.testing.assert_array_equal(left_pad([train[u] for u in users], full)[:, -width:], rows)
      assert (left_pad([train[u] for u in users], full)[:, :-width] == 0).all()  # only padding cut
      np.testing.assert_array_equal(rows[3:7], bucketed.rows(step, 3, 7))  # any shard split
      seen.extend(users.tolist())
    assert len(seen) == len(set(seen)) == 100  # 3 of 103 users sit out each epoch
    assert len(widths) > 1


def test_source_names_cover_the_movielens_formats():
  from rec_llm.data import movielens, sources
  assert sources.MOVIELENS == movielens.FORMATS  # sources avoids importing TFDS for synthetic data
