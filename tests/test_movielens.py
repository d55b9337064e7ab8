"""MovieLens builders: counts, id mappings, chronology, caching and error messages.

The real data lives in shared/ beside the repo (never inside it: its licence forbids
redistribution); the tests that need it skip when it is absent.
"""

import gzip
import os
import time
import zipfile

import numpy as np
import pytest

from rec_llm.data import movielens
from rec_llm.errors import ConfigError
from tests.conftest import ROOT

DATA = os.path.join(ROOT, "..", "shared", "data")
ML100K = os.path.join(DATA, "movielens-100k")
ML1M_GZ = os.path.join(DATA, "movielens-1m", "ratings.partial-users0001-2999.dat.gz")
SASREC = os.path.join(DATA, "sasrec")


def _need(path):
  if not os.path.exists(path):
    pytest.skip(f"MovieLens data not found at {os.path.normpath(path)} (shared/data beside "
                "the repo)")
  return path


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _raw(text, sep):
  """Independent reference parse: int64 [n, k] of the id/timestamp columns, file order."""
  rows = [ln.split(sep) for ln in text.splitlines() if ln.strip()]
  return np.array([[int(f) for f in (r[0], r[1], r[-1])] for r in rows], dtype=np.int64)


def _assert_chronological(h, raw):
  """Each history is the user's ratings sorted by time, ties in file order."""
  users, items, times = raw.T
  n_item = items.max() + 1
  key = users * n_item + items  # No (user, item) pair repeats in these files.
  order = np.argsort(key)
  seq_users = np.repeat(h.user_original_ids, [len(s) for s in h.sequences])
  seq_items = h.item_original_ids[np.concatenate(h.sequences)]
  where = np.searchsorted(key[order], seq_users * n_item + seq_items)
  line = order[where]
  np.testing.assert_array_equal(key[line], seq_users * n_item + seq_items)  # All found...
  assert np.unique(line).size == len(raw)  # ... each rating exactly once.
  same_user = seq_users[1:] == seq_users[:-1]
  dt = np.diff(times[line])
  assert (dt[same_user] >= 0).all()
  assert (np.diff(line)[same_user & (dt == 0)] > 0).all()


def test_ml100k_directory(data_dir):
  h = movielens.load(_need(ML100K), "ml-100k", data_dir)
  assert (h.num_users, h.num_items, h.num_interactions) == (943, 1682, 100_000)
  # Ids are already contiguous, so the mappings are the identity.
  assert h.item_original_ids[0] == -1
  np.testing.assert_array_equal(h.item_original_ids[1:], np.arange(1, 1683))
  np.testing.assert_array_equal(h.user_original_ids, np.arange(1, 944))
  assert all(s.dtype == np.int32 for s in h.sequences)
  with open(os.path.join(ML100K, "u.data")) as f:
    _assert_chronological(h, _raw(f.read(), "\t"))


def test_ml100k_zip_reads_like_the_directory(data_dir, tmp_path):
  zpath = tmp_path / "ml-100k.zip"
  with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
    z.write(os.path.join(_need(ML100K), "u.data"), "ml-100k/u.data")
  a = movielens.load(ML100K, "ml-100k", data_dir)
  b = movielens.load(str(zpath), "ml-100k", data_dir)
  assert b.num_users == a.num_users and b.num_items == a.num_items
  np.testing.assert_array_equal(b.item_original_ids, a.item_original_ids)
  np.testing.assert_array_equal(b.user_original_ids, a.user_original_ids)
  for x, y in zip(a.sequences, b.sequences):
    np.testing.assert_array_equal(x, y)


def test_sasrec_keeps_ids_and_file_order(data_dir):
  h = movielens.load(_need(SASREC), "sasrec", data_dir)
  assert (h.num_users, h.num_items, h.num_interactions) == (6040, 3416, 999_611)
  np.testing.assert_array_equal(h.item_original_ids[1:], np.arange(1, 3417))
  np.testing.assert_array_equal(h.user_original_ids, np.arange(1, 6041))
  with open(os.path.join(SASREC, "ml-1m.txt")) as f:
    raw = np.array(f.read().split(), dtype=np.int64).reshape(-1, 2)
  # The file is sorted by user, so file order is the concatenation of the histories.
  np.testing.assert_array_equal(np.concatenate(h.sequences), raw[:, 1])
  np.testing.assert_array_equal(h.sequences[0], raw[raw[:, 0] == 1, 1])
  # The file itself is accepted too.
  h2 = movielens.load(os.path.join(SASREC, "ml-1m.txt"), "sasrec", data_dir)
  np.testing.assert_array_equal(h2.sequences[-1], h.sequences[-1])


def test_partial_ml1m_gz_is_chronological(data_dir):
  h = movielens.load(_need(ML1M_GZ), "ml-1m", data_dir)
  assert (h.num_users, h.num_interactions) == (2999, 487_650)
  np.testing.assert_array_equal(h.user_original_ids, np.arange(1, 3000))
  assert h.item_original_ids[0] == -1 and (np.diff(h.item_original_ids) > 0).all()
  assert len(h.item_original_ids) == h.num_items + 1 == 3615 + 1
  assert all(s.min() >= 1 and s.max() <= h.num_items for s in h.sequences)
  with gzip.open(ML1M_GZ, "rt", encoding="latin-1") as f:
    _assert_chronological(h, _raw(f.read(), "::"))


def test_ml1m_zip_reindexes_and_sorts_with_stable_ties(data_dir, tmp_path):
  lines = ["10::300::5::50", "2::7::3::10", "10::100::4::20", "10::200::4::20", "2::300::1::5"]
  zpath = tmp_path / "ml-1m.zip"
  with zipfile.ZipFile(zpath, "w") as z:
    z.writestr("ml-1m/README", "not ratings")
    z.writestr("ml-1m/ratings.dat", "\n".join(lines) + "\n")
  h = movielens.load(str(zpath), "ml-1m", data_dir)
  np.testing.assert_array_equal(h.user_original_ids, [2, 10])
  np.testing.assert_array_equal(h.item_original_ids, [-1, 7, 100, 200, 300])
  assert [s.tolist() for s in h.sequences] == [[4, 1], [2, 3, 4]]  # 100 before 200: file order.
  assert (h.num_users, h.num_items, h.num_interactions) == (2, 4, 5)


@pytest.mark.parametrize("fmt", ["ml-20m", "ml-25m"])
def test_csv_formats(data_dir, tmp_path, fmt):
  (tmp_path / "ratings.csv").write_text(
      "userId,movieId,rating,timestamp\r\n"  # Windows line ends are fine.
      "5,296,5.0,1147880044\r\n5,1,3.5,1147868817\r\n9,296,4.0,1\r\n5,50000,0.5,1147868817\r\n")
  h = movielens.load(str(tmp_path), fmt, data_dir)  # The directory holding ratings.csv.
  np.testing.assert_array_equal(h.item_original_ids, [-1, 1, 296, 50000])
  np.testing.assert_array_equal(h.user_original_ids, [5, 9])
  assert [s.tolist() for s in h.sequences] == [[1, 3, 2], [2]]
  # Columns are found by name, in any order.
  (tmp_path / "reordered.csv").write_text("timestamp,rating,movieId,userId\n2,1.0,8,3\n1,1.0,9,3\n")
  h = movielens.load(str(tmp_path / "reordered.csv"), fmt, data_dir)
  np.testing.assert_array_equal(h.item_original_ids, [-1, 8, 9])
  assert [s.tolist() for s in h.sequences] == [[2, 1]]


def test_two_processes_preparing_at_once(data_dir, tmp_path, monkeypatch):
  """The process that loses the race to rename its prepared copy reads the winner's."""
  (tmp_path / "ratings.csv").write_text("userId,movieId,rating,timestamp\n1,10,5,1\n1,20,5,2\n")
  want = movielens.load(str(tmp_path), "ml-20m", data_dir)  # the winner's copy

  def lost_the_race(self, *a, **k):
    raise FileExistsError("Cannot rename incomplete.X_1.0.0: destination 1.0.0 already exists")
  monkeypatch.setattr(movielens.MovieLensHistories, "download_and_prepare", lost_the_race)
  got = movielens.load(str(tmp_path), "ml-20m", data_dir)
  assert [s.tolist() for s in got.sequences] == [s.tolist() for s in want.sequences] == [[1, 2]]
  with pytest.raises(FileExistsError):  # not prepared anywhere: the error stands
    (tmp_path / "other.csv").write_text("userId,movieId,rating,timestamp\n2,30,5,1\n")
    movielens.load(str(tmp_path / "other.csv"), "ml-20m", data_dir)


def test_cache_keeps_the_mapping_and_skips_parsing(data_dir, monkeypatch):
  first = movielens.load(_need(ML1M_GZ), "ml-1m", data_dir)  # Built here or by a test above.

  def no_parse(*args):
    raise AssertionError("the raw file was parsed again")

  monkeypatch.setattr(movielens, "_parse", no_parse)
  t = time.perf_counter()
  again = movielens.load(ML1M_GZ, "ml-1m", data_dir)
  elapsed = time.perf_counter() - t
  np.testing.assert_array_equal(again.item_original_ids, first.item_original_ids)
  np.testing.assert_array_equal(again.user_original_ids, first.user_original_ids)
  for x, y in zip(first.sequences, again.sequences):
    np.testing.assert_array_equal(x, y)
  assert elapsed < 10, elapsed  # Reading back ~3k records, not re-parsing 488k lines.


def test_changed_input_is_rebuilt(data_dir, tmp_path):
  path = tmp_path / "u.data"
  path.write_text("1\t1\t5\t10\n")
  assert movielens.load(str(path), "ml-100k", data_dir).num_interactions == 1
  path.write_text("1\t1\t5\t10\n1\t2\t5\t5\n")  # New size (and mtime): a new cache entry.
  h = movielens.load(str(path), "ml-100k", data_dir)
  assert h.num_interactions == 2 and h.sequences[0].tolist() == [2, 1]


_BAD = [
    # (fmt, file name, content, substrings the message must contain)
    ("ml-1m", "ratings.dat", "1::2::5::100\n12::abc::5\n",
     ["ratings.dat:2:", "expected 'UserID::MovieID::Rating::Timestamp'", "'12::abc::5'"]),
    ("ml-100k", "u.data", "1\t2\t5\t100\n1\t3\t5\t101\n1\tx\t5\t102\n",
     ["u.data:3:", "item id must be an integer", "'x'"]),
    ("sasrec", "ml-1m.txt", "1 2\n0 3\n", ["ml-1m.txt:2:", "user must be a positive integer"]),
    ("ml-1m", "ratings.dat", "1::2::5::100\n1::3::5::yesterday\n",
     ["ratings.dat:2:", "Timestamp must be an integer"]),
    ("ml-1m", "ratings.dat", "\n\n", ["ratings.dat", "no ratings found"]),
    ("ml-20m", "ratings.csv", "", ["ratings.csv", "empty file", "userId,movieId,rating,timestamp"]),
    ("ml-20m", "ratings.csv", "1,2,3.5,4\n", ["ratings.csv:1:", "header is missing"]),
    ("ml-25m", "ratings.csv", "userId,movieId,movieId,timestamp\n1,2,3,4\n",
     ["ratings.csv:1:", "['movieId'] appear more than once"]),
    ("ml-25m", "ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n"
     "userId,movieId,rating,timestamp\n1,3,3,5\n", ["ratings.csv:3:", "header", "appears again"]),
]


@pytest.mark.parametrize("fmt,name,content,expect", _BAD)
def test_malformed_files_name_file_and_line(data_dir, tmp_path, fmt, name, content, expect):
  (tmp_path / name).write_text(content)
  with pytest.raises(movielens.DataError) as e:
    movielens.load(str(tmp_path), fmt, data_dir)
  for s in expect:
    assert s in str(e.value), (s, str(e.value))
  assert isinstance(e.value, ConfigError) and isinstance(e.value, ValueError)


def test_gz_ratings_file_errors_count_decompressed_lines(data_dir, tmp_path):
  path = tmp_path / "ratings.dat.gz"
  path.write_bytes(gzip.compress(b"1::2::5::100\n1::3::5::101\n1::3::5\n"))
  with pytest.raises(movielens.DataError, match=r"ratings\.dat\.gz:3: expected"):
    movielens.load(str(path), "ml-1m", data_dir)


def test_missing_inputs_say_what_was_looked_for(data_dir, tmp_path):
  with pytest.raises(movielens.DataError) as e:
    movielens.load(str(tmp_path), "ml-1m", data_dir)
  assert "ratings.dat" in str(e.value) and "grouplens.org/datasets/movielens" in str(e.value)
  with pytest.raises(movielens.DataError, match="no such file"):
    movielens.load(str(tmp_path / "nope.dat"), "ml-1m", data_dir)
  zpath = tmp_path / "ml-1m.zip"
  with zipfile.ZipFile(zpath, "w") as z:
    z.writestr("ml-1m/movies.dat", "1::Toy Story (1995)::Animation\n")
  with pytest.raises(movielens.DataError) as e:
    movielens.load(str(zpath), "ml-1m", data_dir)
  assert "ml-1m/ratings.dat" in str(e.value) and "ml-1m/movies.dat" in str(e.value)
  with pytest.raises(movielens.DataError) as e:
    movielens.load(str(tmp_path), "ml-10m", data_dir)
  assert all(f in str(e.value) for f in movielens.FORMATS)
