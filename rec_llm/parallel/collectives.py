"""Replica means over one mesh axis, by algorithm, for code inside a manual `jax.shard_map`.

Every function here runs on per-device local arrays inside a `shard_map` that is manual
over `axis` (and may be manual over other axes too: devices that differ in another axis
form independent groups, since every collective names `axis` only).

Algorithms (n replicas, S bytes of float32 per device):
- 'psum': `lax.psum(x) / n`, the XLA baseline (its all-reduce is a ring or tree in the
  runtime; we count it as a ring).
- 'ring': reduce-scatter then all-gather over n chunks, written with `lax.ppermute` (n-1 hops
  each). It may carry ENCODED chunks (a `Codec`): each reduce-scatter hop sends
  encode(partial sum) and the receiver decodes and adds its own chunk; the finished chunk is
  encoded once, forwarded as is through the all-gather and decoded at the end.
- 'hierarchical': the axis as n // group nodes x group devices (consecutive indices share a
  node): ring reduce-scatter inside the node, ring all-reduce of the owned shard across nodes
  (devices with the same in-node index), ring all-gather inside the node. A device sends as
  many bytes as in the flat ring, but only 2(nodes-1)/n of the data crosses the slow
  inter-node links (the flat ring sends most of its hops between nodes).
- 'sparse': all-gather of each replica's k (index, value) pairs, scatter-add, divide by n.

The bytes each algorithm sends per call (`payload.wire_bytes`, `payload.ring_hops`) and the
vocabulary (AGGREGATORS, DENSE) live in rec_llm/parallel/payload.py, which the simulator
shares without JAX.
"""

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from rec_llm.parallel import payload

AGGREGATORS, DENSE = payload.AGGREGATORS, payload.DENSE  # as rec_llm/train names them here


class Codec(NamedTuple):
  """How a ring carries a chunk: encode(chunk [m], key) -> payload pytree; decode(payload) ->
  chunk [m]. Chunk lengths are multiples of `block` (payload.CODEC_CHUNK); `key` is None or
  a fresh PRNG key per encoding (for stochastic codecs; deterministic ones ignore it)."""
  encode: Callable[[jax.Array, Any], Any]
  decode: Callable[[Any], jax.Array]
  block: int = 1


def _ring_perm(rings: list[list[int]]) -> list[tuple[int, int]]:
  """Source->target pairs sending each ring member's data to the next member of its ring."""
  return [(r[j], r[(j + 1) % len(r)]) for r in rings for j in range(len(r))]


def _fold(key, *data):
  if key is None:
    return None
  for d in data:
    key = jax.random.fold_in(key, d)
  return key


def _reduce_scatter(xs, i, perm, axis, codec, key):
  """Ring reduce-scatter of xs [m, c] (member i of an m-ring): returns the fully reduced chunk
  (i + 1) % m. Hop s sends the partial sum of chunk (i - s) % m to the next member."""
  m = xs.shape[0]
  if m == 1:
    return xs[0]

  def hop(acc, s):
    if codec is None:
      recv = lax.ppermute(acc, axis, perm)
    else:
      recv = codec.decode(lax.ppermute(codec.encode(acc, _fold(key, s)), axis, perm))
    return recv + xs[(i - 1 - s) % m], None

  return lax.scan(hop, xs[i % m], jnp.arange(m - 1))[0]


def _all_gather(payload, i, m, perm, axis):
  """Ring all-gather of member i's chunk (i + 1) % m (any pytree): returns it stacked [m, ...]
  in chunk order. Hop s forwards what arrived at hop s - 1, unchanged."""
  if m == 1:
    return jax.tree.map(lambda a: a[None], payload)

  def hop(cur, _):
    cur = lax.ppermute(cur, axis, perm)
    return cur, cur

  _, recv = lax.scan(hop, payload, None, length=m - 1)
  order = (i + 1 - jnp.arange(m)) % m  # hop s holds chunk (i + 1 - s) % m
  return jax.tree.map(lambda a, r: jnp.concatenate([a[None], r])[order], payload, recv)


def _decode_all(codec, stacked, lead):
  """Decodes a payload stacked on `lead` leading dims into [prod(lead) * m] floats."""
  if codec is None:
    return stacked.reshape(-1)
  dec = codec.decode
  for _ in range(lead):
    dec = jax.vmap(dec)
  return dec(stacked).reshape(-1)


def _encode(codec, x, key):
  return x if codec is None else codec.encode(x, key)


def mean(x: jax.Array, *, axis: str, n: int, aggregator: str = "psum", group: int = 0,
         codec: Codec | None = None, key=None) -> jax.Array:
  """Mean of x over the n replicas along `axis`, identical on every replica.

  Args:
    x: this replica's array (any shape; computed in float32, returned in float32).
    axis: the manual mesh axis the replicas lie on.
    n: its size.
    aggregator: 'psum', 'ring' or 'hierarchical' (see the module docstring).
    group: devices per node for 'hierarchical' (must divide n).
    codec: optional `Codec` the ring algorithms carry chunks in; 'psum' ignores it.
    key: PRNG key for a stochastic codec (folded with the hop, so each encoding is fresh).
  """
  shape = x.shape
  flat = x.reshape(-1).astype(jnp.float32)
  if aggregator == "psum" or n == 1:
    return (lax.psum(flat, axis) / n).reshape(shape)
  if aggregator not in ("ring", "hierarchical"):
    raise ValueError(f"aggregator={aggregator!r} is not a dense mean; use one of {DENSE}")
  c = payload.chunk(flat.size, n, codec.block if codec else 1)
  padded = jnp.pad(flat, (0, n * c - flat.size))
  i = lax.axis_index(axis)
  if aggregator == "ring":
    perm = _ring_perm([list(range(n))])
    owned = _reduce_scatter(padded.reshape(n, c), i, perm, axis, codec, _fold(key, 0))
    stacked = _all_gather(_encode(codec, owned, _fold(key, 1, 0)), i, n, perm, axis)
    out = _decode_all(codec, stacked, 1)
  else:
    g = group
    if g <= 0 or n % g:
      raise ValueError(f"group={group} must divide the {n} replicas for 'hierarchical'")
    nodes, node, local = n // g, i // g, i % g
    intra = _ring_perm([[b * g + j for j in range(g)] for b in range(nodes)])
    inter = _ring_perm([[j * g + l for j in range(nodes)] for l in range(g)])
    shard = _reduce_scatter(padded.reshape(g, nodes * c), local, intra, axis, codec,
                            _fold(key, 0))
    owned = _reduce_scatter(shard.reshape(nodes, c), node, inter, axis, codec, _fold(key, 1))
    stacked = _all_gather(_encode(codec, owned, _fold(key, 2, 0)), node, nodes, inter, axis)
    stacked = _all_gather(stacked, local, g, intra, axis)
    out = _decode_all(codec, stacked, 2)
  return (out[:flat.size] / n).reshape(shape)


def sparse_mean(indices: jax.Array, values: jax.Array, size: int, *, axis: str, n: int,
                base=None) -> jax.Array:
  """Mean over replicas of sparse vectors given as k (index, value) pairs each: [size] floats.

  Both arrays (any dtypes, e.g. uint16 offsets and bfloat16 values, same shape [k]) are
  all-gathered, so every replica scatter-adds the same n*k pairs in the same order.
  `base` ([k] int32, static) is added to the gathered indices: indices may then be small
  offsets (uint16) inside blocks that start at `base`.
  """
  idx = lax.all_gather(indices.reshape(-1), axis, tiled=True).astype(jnp.int32)
  # Floats travel as same-width unsigned ints: XLA:CPU would widen bf16 to f32 for the gather.
  bits = jnp.dtype(f"uint{8 * values.dtype.itemsize}")
  val = lax.all_gather(lax.bitcast_convert_type(values.reshape(-1), bits), axis, tiled=True)
  val = lax.bitcast_convert_type(val, values.dtype).astype(jnp.float32)
  if base is not None:
    idx = (idx.reshape(n, -1) + jnp.asarray(base, jnp.int32)[None]).reshape(-1)
  return jnp.zeros((size,), jnp.float32).at[idx].add(val) / n
