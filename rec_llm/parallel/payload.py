"""The data-parallel vocabulary and the exact bytes each reduction sends, without JAX.

One source of truth for the code that runs the reduction (collectives.py, compression.py,
rec_llm/train) and the simulator that prices it (rec_llm/sim, which must plan without JAX):
the kinds, aggregators and modes, the codecs' chunk sizes, the layouts the compressors cut
gradients into, and the collective calls (`Reduction`s) a compressor makes.

Wire bytes each device sends per call, n replicas, E(m) = bytes of m encoded entries (4m as
float32), c = ceil(numel / n) rounded up to the codec's chunk, g = group (devices per node):
  psum          2(n-1)/n * 4 numel                  (an optimal ring all-reduce)
  ring          2(n-1) * E(c)                       (= psum's when uncompressed)
  hierarchical  2(g-1) * (n/g) * E(c) + 2(n/g - 1) * E(c)
  sparse        (n-1) * pairs * pair_bytes          (all-gather of every replica's pairs)
  reduce_scatter, all_gather  (n-1)/n * 4 numel     (ZeRO's halves of an all-reduce)
Encoded sizes: int8 and qsgd m + 4m/256 (int8 levels, also for bits < 8: no sub-byte
packing), sign m/8 + 4m/1024; top-k pairs are a uint16 offset and a bfloat16 value.
`hlo_wire_bytes` turns `hlo_stats.collective_bytes` payloads into the same units.
"""

import math
from typing import NamedTuple

from rec_llm.errors import ConfigError

KINDS = ("none", "topk", "randomk", "qsgd", "int8", "sign", "powersgd")
AGGREGATORS = ("psum", "ring", "hierarchical", "sparse")
DENSE = ("psum", "ring", "hierarchical")      # aggregators of a dense mean
CARRYING = ("ring", "hierarchical")           # dense aggregators that carry encoded chunks
HALVES = ("reduce_scatter", "all_gather")     # ZeRO's collectives (dp.zero), not user choices
DP_MODES = ("sync", "stale", "local_sgd")
LOSSY = frozenset(KINDS) - {"none"}
# Kinds that keep what they did not send in an error-feedback residual (a copy of the
# gradient per device); QSGD is unbiased and keeps none.
ERROR_FEEDBACK = frozenset({"topk", "randomk", "int8", "sign", "powersgd"})

TOPK_BLOCK = 65_536   # uint16 offsets address a block
TOPK_PAIR_BYTES = 4   # uint16 offset + bfloat16 value
INT8_CHUNK = QSGD_CHUNK = 256
SIGN_CHUNK = 1_024    # 128 bytes of signs + a 4-byte scale: 1/31 of float32
POWERSGD_MIN_SIZE = 4_096  # smaller leaves (and vectors) go dense
CODEC_CHUNK = {"int8": INT8_CHUNK, "qsgd": QSGD_CHUNK, "sign": SIGN_CHUNK}


def check(kind: str, aggregator: str, replicas: int, ratio: float = 0.01, bits: int = 8,
          rank: int = 4, group: int = 0, momentum: float = 0.0) -> None:
  """Raises ConfigError naming the fix for a compressor + aggregator the code cannot run."""
  if kind not in KINDS:
    raise ConfigError(f"unknown compression kind {kind!r}; choose one of {KINDS}")
  if aggregator not in AGGREGATORS:
    raise ConfigError(f"unknown aggregator {aggregator!r}; choose one of {AGGREGATORS}")
  allowed = ("sparse", "psum") if kind == "topk" else DENSE
  if aggregator not in allowed:
    raise ConfigError(f"aggregator={aggregator!r} does not fit compression kind {kind!r}; "
                      f"use one of {allowed}")
  if not isinstance(replicas, int) or replicas < 1:
    raise ConfigError(f"replicas={replicas} must be a positive integer: the size of the data axis")
  if kind in ("topk", "randomk") and not 0 < ratio <= 1:
    raise ConfigError(f"ratio={ratio} is outside (0, 1]; it is the fraction of entries sent, "
                      f"e.g. ratio=0.01")
  if kind == "qsgd" and not (isinstance(bits, int) and 2 <= bits <= 8):
    raise ConfigError(f"bits={bits} is outside [2, 8]; QSGD sends int8 levels, e.g. bits=8")
  if kind == "powersgd" and not (isinstance(rank, int) and rank > 0):
    raise ConfigError(f"rank={rank} must be a positive integer for PowerSGD, e.g. rank=4")
  if aggregator == "hierarchical" and not (isinstance(group, int) and group > 0 and
                                           replicas % group == 0):
    raise ConfigError(f"group={group} must be a positive divisor of replicas={replicas} "
                      f"(devices per node) for the hierarchical aggregator, e.g. group=2")
  if kind == "topk" and not 0 <= momentum < 1:
    raise ConfigError(f"momentum={momentum} is outside [0, 1); use 0 for plain top-k")


# ----------------------------------------------------------------------------- layouts

def topk_layout(size: int, ratio: float) -> tuple[int, int, int]:
  """(block length, blocks, k per block) of one leaf of `size` entries."""
  block = min(TOPK_BLOCK, size)
  return block, math.ceil(size / block), math.ceil(ratio * block)


def randomk_layout(total: int, ratio: float) -> tuple[int, int]:
  """(k, stride): one index drawn from each of k stretches of `stride` entries."""
  stride = math.ceil(total / math.ceil(ratio * total))
  return math.ceil(total / stride), stride


def powersgd_layout(shape, rank: int) -> tuple[int, int, int] | None:
  """(rows, cols, rank) of a leaf's low-rank factorisation, or None to send it dense."""
  size = math.prod(shape)
  if len(shape) < 2 or size < POWERSGD_MIN_SIZE:
    return None
  # The most square [rows, cols] view (split between leading and trailing dims): a stacked
  # [layers, ...] kernel seen as [layers, rest] would barely compress.
  cut = min(range(1, len(shape)),
            key=lambda k: abs(math.log(math.prod(shape[:k]) / math.prod(shape[k:]))))
  a = math.prod(shape[:cut])
  b = size // a
  return a, b, min(rank, a, b)


# ----------------------------------------------------------------------------- bytes

def chunk(numel: int, n: int, block: int = 1) -> int:
  """Entries per ring chunk: ceil(numel / n) rounded up to the codec's block."""
  return max(1, math.ceil(math.ceil(numel / n) / block)) * block


def encoded_bytes(codec: str | None, m: int) -> int:
  """E(m): bytes of the payload that encodes m entries (m a multiple of the codec's chunk)."""
  if codec is None:
    return 4 * m
  scales = 4 * math.ceil(m / CODEC_CHUNK[codec])  # one float32 scale per chunk
  return (math.ceil(m / 8) if codec == "sign" else m) + scales


def ring_hops(aggregator: str, n: int, numel: int, *, group: int = 0,
              codec: str | None = None) -> list[tuple[int, int, int]]:
  """(hops, bytes per hop, ring size) of each ring of a 'ring' / 'hierarchical' mean, in
  order: the flat ring; or the ring inside each node (its reduce-scatter and all-gather
  hops carry a node's n/g chunks), then the ring across nodes."""
  e = encoded_bytes(codec, chunk(numel, n, CODEC_CHUNK.get(codec, 1)))
  if aggregator == "ring":
    return [(2 * (n - 1), e, n)]
  nodes = n // group
  return [(2 * (group - 1), nodes * e, group), (2 * (nodes - 1), e, nodes)]


def wire_bytes(aggregator: str, n: int, numel: int, *, group: int = 0,
               codec: str | None = None, pair_bytes: int = 8) -> int:
  """Bytes each device sends for one mean of `numel` float32 entries (for 'sparse': of
  `numel` pairs of `pair_bytes` each) over n replicas. Formulas: module docstring."""
  if n == 1 or numel == 0:
    return 0
  if aggregator == "psum":
    return round(2 * (n - 1) / n * 4 * numel)
  if aggregator in HALVES:
    return round((n - 1) / n * 4 * numel)
  if aggregator == "sparse":
    return (n - 1) * numel * pair_bytes
  if aggregator not in CARRYING:
    raise ValueError(f"unknown aggregator {aggregator!r}; choose one of {AGGREGATORS}")
  return sum(h * b for h, b, _ in ring_hops(aggregator, n, numel, group=group, codec=codec))


def hlo_wire_bytes(by_kind: dict, n: int) -> float:
  """Wire bytes per device from `hlo_stats` payloads {kind: bytes} of collectives over n
  devices: all-reduce x 2(n-1)/n, all-gather / reduce-scatter / all-to-all x (n-1)/n,
  collective-permute as is (its result is what one hop sends)."""
  f = (n - 1) / n
  return (by_kind.get("all-reduce", 0) * 2 * f + by_kind.get("collective-permute", 0) +
          f * sum(by_kind.get(k, 0) for k in ("all-gather", "reduce-scatter", "all-to-all")))


class Reduction(NamedTuple):
  """One mean a compressor calls: `numel` float32 entries by `aggregator`, its ring chunks
  encoded by `codec` (None: float32); for 'sparse', `numel` pairs of `pair_bytes`."""
  aggregator: str
  numel: int
  codec: str | None = None
  pair_bytes: int = 8

  def wire_bytes(self, n: int, group: int = 0) -> int:
    return wire_bytes(self.aggregator, n, self.numel, group=group, codec=self.codec,
                      pair_bytes=self.pair_bytes)


def reductions(kind: str, shapes, *, replicas: int, aggregator: str = "psum",
               ratio: float = 0.01, bits: int = 8, rank: int = 4,
               group: int = 0) -> list[Reduction]:
  """The means one compressor `update` calls, in order, for gradient leaves of these shapes
  (one device's local shards): PowerSGD's P (with its dense leaves) then Q; top-k's pairs
  (or, with 'psum', its decoded blocks); one mean of the flattened tree otherwise."""
  check(kind, aggregator, replicas, ratio, bits, rank, group)
  shapes = [tuple(s) for s in shapes]
  total = sum(math.prod(s) for s in shapes)
  if kind == "none":
    return [Reduction(aggregator, total)]
  if kind in CODEC_CHUNK:  # with 'psum' decoded first: the float32 mean
    return [Reduction(aggregator, total, kind if aggregator in CARRYING else None)]
  if kind == "topk":
    lays = [topk_layout(math.prod(s), ratio) for s in shapes]
    if aggregator == "psum":
      return [Reduction("psum", sum(nb * block for block, nb, _ in lays))]
    return [Reduction("sparse", sum(nb * kb for _, nb, kb in lays), pair_bytes=TOPK_PAIR_BYTES)]
  if kind == "randomk":
    return [Reduction(aggregator, randomk_layout(total, ratio)[0])]
  lays = [(powersgd_layout(s, rank), math.prod(s)) for s in shapes]
  first = sum(size if lay is None else lay[0] * lay[2] for lay, size in lays)
  second = sum(lay[1] * lay[2] for lay, _ in lays if lay is not None)
  return [Reduction(aggregator, numel) for numel in (first, second) if numel]


def payload_bytes(kind: str, shapes, *, replicas: int, aggregator: str = "psum",
                  ratio: float = 0.01, bits: int = 8, rank: int = 4, group: int = 0) -> int:
  """Wire bytes each device sends per compressor `update` for leaves of these shapes."""
  return sum(r.wire_bytes(replicas, group) for r in reductions(
      kind, shapes, replicas=replicas, aggregator=aggregator, ratio=ratio, bits=bits,
      rank=rank, group=group))


def dense_bytes(shapes, replicas: int) -> int:
  """Wire bytes per device of the uncompressed float32 psum (the baseline)."""
  return wire_bytes("psum", replicas, sum(math.prod(s) for s in shapes))
