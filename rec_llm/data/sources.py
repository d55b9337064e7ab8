"""Sequence sources picked by `config.data.name`."""

from ml_collections import ConfigDict

from rec_llm.data.synthetic import SyntheticSequences
from rec_llm.errors import ConfigError

SOURCES = ("synthetic",)


def num_items(data_cfg: ConfigDict) -> int:
  check_name(data_cfg.name)
  return int(data_cfg.num_items)


def check_name(name: str) -> None:
  if name not in SOURCES:
    raise ConfigError(f"unknown data.name={name!r}; choose one of {list(SOURCES)}")


def make_source(data_cfg: ConfigDict, seq_len: int, seed: int):
  """A source of left-padded sequences of `seq_len` items (inputs + the shifted target)."""
  check_name(data_cfg.name)
  return SyntheticSequences(int(data_cfg.num_items), seq_len, seed=seed,
                            zipf_a=float(data_cfg.get("zipf_a", 1.1)),
                            p_follow=float(data_cfg.get("p_follow", 0.8)))
