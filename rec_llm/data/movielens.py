"""MovieLens ratings as per-user chronological histories, prepared once with TFDS.

`load(path, fmt)` parses the raw GroupLens file (a directory, the ratings file itself,
a `.gz` of it, or the GroupLens zip), writes one array_record example per user through
a `tfds.core.GeneratorBasedBuilder`, and reads it back with `as_data_source()`.
TensorFlow is not needed. The prepared copy is cached under `data_dir` in a config named
after the format and a hash of the input's path, size and mtime, so an edited input is
never served from a stale cache.

Items are re-indexed 1..N by ascending original id (0 stays padding), users 0..U-1 by
ascending original id; both mappings are stored with the prepared dataset.

MovieLens is not open data: research use only, no redistribution, cite Harper & Konstan
(2015). Nothing here downloads or copies it; users fetch it from GroupLens themselves.
"""

import dataclasses
import gzip
import hashlib
import logging
import os
import zipfile

import numpy as np
import tensorflow_datasets as tfds

from rec_llm.errors import ConfigError

FORMATS = ("ml-1m", "ml-100k", "ml-20m", "ml-25m", "sasrec")
DOWNLOAD_URL = "https://grouplens.org/datasets/movielens/"
_CSV_HEADER = ("userId", "movieId", "rating", "timestamp")
_CHUNK_LINES = 1 << 20


class DataError(ConfigError):
  """A raw data file is missing or malformed; the message names the file and line."""


@dataclasses.dataclass(frozen=True)
class _Format:
  files: tuple[str, ...]  # Ratings file names, looked for in this order.
  fields: tuple[str, ...]  # Column names, as the GroupLens README spells them.
  sep: str | None  # None: any run of whitespace.
  sep_name: str  # For error messages.
  shown_sep: str  # Joins `fields` into the expected-line example.
  user: int  # Column positions (csv: overridden by the header).
  item: int
  time: int | None  # None: the file is already chronological (sasrec).
  header: bool = False


_FMT = {
    "ml-1m": _Format(("ratings.dat",), ("UserID", "MovieID", "Rating", "Timestamp"),
                     "::", "'::'", "::", 0, 1, 3),
    "ml-100k": _Format(("u.data",), ("user id", "item id", "rating", "timestamp"),
                       None, "tabs", "\t", 0, 1, 3),
    "ml-20m": _Format(("ratings.csv",), _CSV_HEADER, ",", "','", ",", 0, 1, 3, header=True),
    "ml-25m": _Format(("ratings.csv",), _CSV_HEADER, ",", "','", ",", 0, 1, 3, header=True),
    "sasrec": _Format(("ml-1m.txt",), ("user", "item"), None, "whitespace", " ", 0, 1, None),
}


@dataclasses.dataclass(frozen=True)
class Histories:
  """Per-user item sequences (ids 1..num_items, oldest first) and the id mappings."""
  sequences: list[np.ndarray]  # int32, one per user index 0..num_users-1.
  num_items: int
  item_original_ids: np.ndarray  # int64 [num_items + 1]; [0] = -1 is padding.
  user_original_ids: np.ndarray  # int64 [num_users].

  @property
  def num_users(self) -> int:
    return len(self.sequences)

  @property
  def num_interactions(self) -> int:
    return int(sum(len(s) for s in self.sequences))


# ----------------------------------------------------------------------------- input


@dataclasses.dataclass(frozen=True)
class _Source:
  """A resolved ratings file: where it is, how to read it, and what names it in errors."""
  name: str  # Shown in error messages.
  file: str  # The file on disk (the zip, for a zip member).
  member: str | None = None  # Zip member.

  def read(self) -> bytes:
    if self.member is not None:
      with zipfile.ZipFile(self.file) as z:
        raw = z.read(self.member)
    else:
      with open(self.file, "rb") as f:
        raw = f.read()
    if (self.member or self.file).endswith(".gz"):
      try:
        raw = gzip.decompress(raw)
      except (OSError, EOFError) as e:
        raise DataError(f"{self.name}: not a valid gzip file ({e})") from e
    return raw

  def fingerprint(self, fmt: str) -> str:
    """Changes whenever the input (or how we read it) changes: keys the cache."""
    st = os.stat(self.file)
    key = f"{fmt}|{os.path.realpath(self.file)}|{self.member}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def _check_fmt(fmt: str) -> _Format:
  if fmt not in _FMT:
    raise DataError(f"unknown MovieLens format {fmt!r}; choose one of {list(FORMATS)}")
  return _FMT[fmt]


def _resolve(path: str, fmt: str) -> _Source:
  """Finds the ratings file of `fmt` in a directory, a zip, or takes `path` as the file."""
  spec = _check_fmt(fmt)
  path = os.path.expanduser(os.fspath(path))
  names = [n + gz for n in spec.files for gz in ("", ".gz")]
  hint = (f"download the {fmt} data from {DOWNLOAD_URL} and pass its directory, "
          "its zip or its ratings file")
  if os.path.isdir(path):
    # Also accept the folder a GroupLens zip was extracted into (`path/ml-1m/ratings.dat`).
    tried = [os.path.join(path, n) for n in names] + [os.path.join(path, fmt, n) for n in names]
    for p in tried:
      if os.path.isfile(p):
        return _Source(p, p)
    raise DataError(f"no {fmt} ratings file in {path}: looked for {', '.join(tried)}; {hint}")
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such file or directory (expected the {fmt} directory, zip "
                    f"or one of {names}); {hint}")
  if path.endswith(".zip"):
    try:
      with zipfile.ZipFile(path) as z:
        members = [m for m in z.namelist() if not m.endswith("/")]
    except zipfile.BadZipFile as e:
      raise DataError(f"{path}: not a valid zip file ({e}); {hint}") from e
    tried = [f"{fmt}/{n}" for n in names] + names
    found = [m for m in tried if m in members]
    if not found:  # Any single member with the right base name (e.g. a renamed top folder).
      found = [m for m in members if os.path.basename(m) in names]
      if len(found) > 1:
        raise DataError(f"{path}: several candidate ratings files {found}; pass one of them "
                        "extracted, or a zip holding one")
    if not found:
      shown = ", ".join(members[:10]) + (" ..." if len(members) > 10 else "")
      raise DataError(f"{path}: no {fmt} ratings member; looked for {', '.join(tried)} "
                      f"(the zip holds: {shown or 'nothing'}); {hint}")
    return _Source(f"{path}[{found[0]}]", path, found[0])
  return _Source(path, path)


# ----------------------------------------------------------------------------- parsing


def _expected(spec: _Format) -> str:
  shown = spec.shown_sep.join(spec.fields)
  return f"expected {shown!r} ({len(spec.fields)} fields separated by {spec.sep_name})"


def _first_error(lines: list[str], start: int, spec: _Format, name: str,
                 cols: tuple[int, int, int | None], header: str | None) -> DataError:
  """Slow line-by-line check, run only once the fast path failed, to name the bad line."""
  user, item, time = cols
  checks = [(user, spec.fields[spec.user], True), (item, spec.fields[spec.item], True)]
  if time is not None:
    checks.append((time, spec.fields[spec.time], False))
  for i in range(start, len(lines)):
    line = lines[i]
    if not line or line.isspace():
      continue
    at = f"{name}:{i + 1}"
    if header is not None and line.strip() == header:
      return DataError(f"{at}: the header {header!r} appears again (were several files "
                       "concatenated?); keep only the header on line 1")
    fields = line.split(spec.sep)
    if len(fields) != len(spec.fields):
      return DataError(f"{at}: {_expected(spec)}, got {line!r}")
    for c, label, is_id in checks:
      try:
        v = int(fields[c])
      except ValueError:
        return DataError(f"{at}: {label} must be an integer, got {fields[c]!r} in {line!r}")
      if is_id and v <= 0:
        return DataError(f"{at}: {label} must be a positive integer (ids start at 1), "
                         f"got {fields[c]!r} in {line!r}")
      if not -2**63 <= v < 2**63:
        return DataError(f"{at}: {label} {fields[c]!r} does not fit in 64 bits, in {line!r}")
  return DataError(f"{name}: malformed; {_expected(spec)}")  # Not reached in practice.


def _parse_header(line: str, spec: _Format, name: str) -> tuple[int, int, int]:
  """Column positions from a csv header; the columns may come in any order."""
  cols = [c.strip() for c in line.strip().split(",")]
  want = ",".join(spec.fields)
  dup = sorted({c for c in cols if cols.count(c) > 1})
  if dup:
    raise DataError(f"{name}:1: header column(s) {dup} appear more than once in {line!r}; "
                    f"expected {want!r}")
  if sorted(cols) != sorted(spec.fields):
    try:  # A first line of numbers means the header is missing, not misspelt.
      [float(c) for c in cols]
      what = "a data line: the header is missing"
    except ValueError:
      what = repr(line)
    raise DataError(f"{name}:1: expected the header {want!r}, got {what}")
  return cols.index(spec.fields[0]), cols.index(spec.fields[1]), cols.index(spec.fields[3])


def _parse(raw: bytes, fmt: str, name: str):
  """Returns int64 arrays (users, items, timestamps or None), one entry per rating line."""
  spec = _FMT[fmt]
  if raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 byte-order mark.
    raw = raw[3:]
  # latin-1 never fails to decode (ml-1m is latin-1); stray bytes surface as bad fields.
  text = raw.decode("latin-1")
  if "\r" in text:
    text = text.replace("\r\n", "\n")
  lines = text.split("\n")
  start, header, (user, item, time) = 0, None, (spec.user, spec.item, spec.time)
  if spec.header:
    if not lines[0].strip():
      raise DataError(f"{name}: empty file (no header, no ratings); expected the header "
                      f"{','.join(spec.fields)!r} then lines like '1,296,5.0,1147880044'")
    user, item, time = _parse_header(lines[0], spec, name)
    start, header = 1, lines[0].strip()
  cols = (user, item, time)
  n = len(spec.fields)
  parts = []
  # Chunks bound the memory of the split fields (ml-25m has 25M lines).
  for lo in range(start, len(lines), _CHUNK_LINES):
    rows = [ln.split(spec.sep) for ln in lines[lo:lo + _CHUNK_LINES] if ln and not ln.isspace()]
    if not rows:
      continue
    try:
      if any(len(r) != n for r in rows):
        raise ValueError
      chunk = [np.array([r[c] for r in rows], dtype=np.int64) for c in cols if c is not None]
      if chunk[0].min() <= 0 or chunk[1].min() <= 0:
        raise ValueError
    except (ValueError, OverflowError):
      # The fast path only knows the chunk is bad; find and name the line.
      raise _first_error(lines, lo, spec, name, cols, header) from None
    parts.append(chunk)
  if not parts:
    raise DataError(f"{name}: no ratings found (the file has no data lines); "
                    f"{_expected(spec)} on each line")
  users, items, *times = [np.concatenate(c) for c in zip(*parts)]
  return users, items, (times[0] if times else None)


def _histories_from_arrays(users, items, times):
  """Re-indexes ids and groups by user; returns (sequences, item_orig, user_orig)."""
  user_orig, uidx = np.unique(users, return_inverse=True)
  item_orig, iidx = np.unique(items, return_inverse=True)
  order = np.arange(len(users))
  if times is not None:  # Chronological; equal timestamps keep file order (stable).
    order = np.argsort(times, kind="stable")
  order = order[np.argsort(uidx[order], kind="stable")]
  seq = (iidx[order] + 1).astype(np.int32)
  counts = np.bincount(uidx, minlength=len(user_orig))
  sequences = np.split(seq, np.cumsum(counts)[:-1])
  return sequences, item_orig.astype(np.int64), user_orig.astype(np.int64)


# ----------------------------------------------------------------------------- TFDS


class MovieLensHistoriesConfig(tfds.core.BuilderConfig):
  """One config per (format, input file): its name carries the input's fingerprint."""

  def __init__(self, *, source: _Source, fmt: str, **kwargs):
    super().__init__(name=f"{fmt}-{source.fingerprint(fmt)}",
                     description=f"{fmt} histories of {source.name}", **kwargs)
    self.source, self.fmt = source, fmt


class MovieLensHistories(tfds.core.GeneratorBasedBuilder):
  """One example per user: its index, original id and chronological item ids."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  # No BUILDER_CONFIGS: every input gets its own config (see `_builder`).

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls):
    # TFDS looks beside the code for download checksums; we download nothing, and the
    # lookup would import `importlib_resources`, which is not among our requirements.
    return None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="MovieLens per-user histories (ids re-indexed; see metadata).",
        features=tfds.features.FeaturesDict({
            "user": tfds.features.Scalar(dtype=np.int64),
            "user_original_id": tfds.features.Scalar(dtype=np.int64),
            "items": tfds.features.Tensor(shape=(None,), dtype=np.int32),
        }),
        # The item mapping travels with the prepared data, so a cached load needs no raw file.
        metadata=tfds.core.MetadataDict(),
        homepage=DOWNLOAD_URL,
        citation="F. Maxwell Harper and Joseph A. Konstan. 2015. The MovieLens Datasets: "
                 "History and Context. ACM TiiS 5, 4, Article 19.",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Reads local files only.
    cfg = self.builder_config
    users, items, times = _parse(cfg.source.read(), cfg.fmt, cfg.source.name)
    sequences, item_orig, user_orig = _histories_from_arrays(users, items, times)
    self.info.metadata.update({
        "format": cfg.fmt, "source": cfg.source.name,
        "num_items": len(item_orig), "num_users": len(user_orig),
        "num_interactions": int(len(users)),
        "item_original_ids": item_orig.tolist(),  # New id i+1 <- original item_orig[i].
    })
    return {"train": self._generate_examples(sequences, user_orig)}

  def _generate_examples(self, sequences, user_orig):
    for u, (seq, orig) in enumerate(zip(sequences, user_orig)):
      yield u, {"user": u, "user_original_id": int(orig), "items": seq}


def _builder(path: str, fmt: str, data_dir: str | None) -> MovieLensHistories:
  if data_dir is None:
    data_dir = os.environ.get("REC_LLM_DATA_DIR") or os.path.join(
        os.path.expanduser("~"), ".cache", "rec_llm", "tfds")
  cfg = MovieLensHistoriesConfig(source=_resolve(path, fmt), fmt=fmt)
  # Every config here is "custom" by design; TFDS would warn about it on every load.
  absl_logger, quiet = logging.getLogger("absl"), _QuietCustomConfig()
  absl_logger.addFilter(quiet)
  try:
    return MovieLensHistories(config=cfg, data_dir=os.path.expanduser(data_dir),
                              file_format="array_record")
  finally:
    absl_logger.removeFilter(quiet)


class _QuietCustomConfig(logging.Filter):

  def filter(self, record):
    return not record.getMessage().startswith("Using custom data configuration")


def load(path: str, fmt: str, data_dir: str | None = None) -> Histories:
  """Builds (once, cached under data_dir) and reads the histories of the raw data at `path`."""
  builder = _builder(path, fmt, data_dir)
  try:
    builder.download_and_prepare()  # No-op when this input is already prepared.
  except FileExistsError:
    # Another process prepared the same input at the same time and moved its copy into
    # place first (TFDS prepares in a temporary directory and renames it): read that one.
    builder = _builder(path, fmt, data_dir)
    if not builder.is_prepared():
      raise
  ds = builder.as_data_source(split="train")
  records = ds.__getitems__(range(len(ds)))
  # Records are stored in key-hash order: put them back in user order.
  sequences = [None] * len(records)
  user_orig = np.empty(len(records), np.int64)
  for r in records:
    u = int(r["user"])
    sequences[u] = np.asarray(r["items"], dtype=np.int32)
    user_orig[u] = r["user_original_id"]
  meta = builder.info.metadata
  item_orig = np.asarray([-1] + list(meta["item_original_ids"]), dtype=np.int64)
  if any(s is None for s in sequences) or len(item_orig) != meta["num_items"] + 1:
    raise DataError(f"prepared data in {builder.data_dir} is incomplete; delete that folder "
                    "and load again")
  return Histories(sequences, int(meta["num_items"]), item_orig, user_orig)
