"""Gradient compression for the data-parallel all-reduce, as optax transformations.

    comp = make("topk", axis="data", replicas=n, aggregator="sparse", ratio=0.001)
    state = comp.init(params_local)                    # the same on every replica
    mean_grads, state = comp.update(local_grads, state)  # inside a shard_map manual over 'data'

`update` takes this replica's local gradients and returns the replica MEAN of the compressed
gradients, identical on every replica of the group, and this replica's new state. All arrays
are per-device local arrays: the `shard_map` must be manual over `axis` (other manual axes,
e.g. 'tensor', just form independent groups). Results of 'ring', 'hierarchical' and 'sparse'
come from ppermute / all_gather and are typed as varying over `axis`: return them through
an out_spec that names `axis`, or use `check_vma=False`.

Kinds (the compressors keep what they did not send in an error-feedback residual, so nothing
is lost, only delayed; the invariant is new_residual + sent == grad + old_residual):
- 'none': the dense mean by the aggregator ('psum', 'ring' or 'hierarchical').
- 'topk' (ratio): per leaf, flattened into blocks of up to 65,536 elements, the k_block =
  ceil(ratio * block) largest |entries| of each block; sent as bfloat16 values and uint16
  offsets (4 bytes a pair) and averaged by the sparse all-gather ('sparse'; 'psum' = dense psum
  of the decoded tensor, for comparison). With momentum > 0 it is DGC: local momentum
  u = m*u + g, v += u, send top-k of v, zero u and v where sent (momentum factor masking);
  run it with a momentum-free optimiser after it. bf16 rounding of sent values stays in v.
- 'randomk' (ratio): one random entry from each consecutive stretch of ceil(1/ratio) entries
  of the flattened gradients (stratified, no repeats), drawn from a key shared by all replicas
  and the step (same indices everywhere), so the k values go through the dense aggregator.
- 'qsgd' (bits): stochastic rounding to 2^(bits-1)-1 levels per sign of |x| / max|chunk|
  (chunks of 256), unbiased; randomness per replica and step. No error feedback.
- 'int8': round to nearest of x / (max|chunk| / 127), chunks of 256; error feedback.
- 'sign': sign(x) * mean|chunk|, chunks of 1,024, bits packed 8 to a byte; error feedback.
- 'powersgd' (rank): per leaf reshaped to its most square [leading dims, trailing dims]:
  P = M Q, mean P, orthonormalise, Q = M^T P, mean Q, approximation P Q^T (one power step,
  Q warm-started from the previous step); leaves with ndim < 2 or fewer than 4,096 entries
  go dense. Error feedback.

Quantised kinds ('qsgd', 'int8', 'sign') with aggregator 'ring' / 'hierarchical' make the ring
carry encoded chunks (each reduce-scatter hop re-encodes its partial sum; that requantisation
is not error-fed-back). With 'psum' they decode first and psum float32: the same arithmetic
without the savings. Only the carrying aggregators (and 'sparse') cut the bytes on the wire.

`payload_bytes` gives the wire bytes each device sends per step, `dense_bytes` the
uncompressed psum baseline: rec_llm/parallel/payload.py holds their formulas, the chunk sizes
and the layouts above (shared with the simulator, without JAX).
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from rec_llm.errors import ConfigError
from rec_llm.parallel import collectives, payload
from rec_llm.parallel.collectives import Codec
from rec_llm.parallel.payload import INT8_CHUNK, QSGD_CHUNK, SIGN_CHUNK

KINDS = payload.KINDS  # as rec_llm/train names them here


# ----------------------------------------------------------------------------- codecs

def _rows(x, chunk):
  return x.reshape(-1, chunk)


def _int8_encode(x, key=None):
  xb = _rows(x, INT8_CHUNK)
  scale = jnp.max(jnp.abs(xb), axis=1) / 127
  q = jnp.round(xb / jnp.where(scale > 0, scale, 1)[:, None])
  return jnp.clip(q, -127, 127).astype(jnp.int8), scale


def _int8_decode(payload):
  q, scale = payload
  return (q.astype(jnp.float32) * scale[:, None]).reshape(-1)


def _qsgd_codec(bits: int) -> Codec:
  levels = 2 ** (bits - 1) - 1

  def encode(x, key):
    xb = _rows(x, QSGD_CHUNK)
    scale = jnp.max(jnp.abs(xb), axis=1)
    level = jnp.abs(xb) / jnp.where(scale > 0, scale, 1)[:, None] * levels
    lo = jnp.floor(level)
    up = jax.random.uniform(key, xb.shape) < level - lo  # P(up) = level - lo: unbiased
    return (jnp.sign(xb) * (lo + up)).astype(jnp.int8), scale

  def decode(payload):
    q, scale = payload
    return (q.astype(jnp.float32) * (scale / levels)[:, None]).reshape(-1)

  return Codec(encode, decode, QSGD_CHUNK)


_SHIFTS = np.arange(8, dtype=np.uint8)


def _sign_encode(x, key=None):
  xb = _rows(x, SIGN_CHUNK)
  scale = jnp.mean(jnp.abs(xb), axis=1)
  bits = (xb >= 0).reshape(-1, 8).astype(jnp.uint8) << _SHIFTS
  return jnp.sum(bits, axis=1, dtype=jnp.uint8), scale


def _sign_decode(payload):
  packed, scale = payload
  bits = (packed[:, None] >> _SHIFTS) & 1
  signs = _rows(bits.astype(jnp.float32) * 2 - 1, SIGN_CHUNK)
  return (signs * scale[:, None]).reshape(-1)


INT8 = Codec(_int8_encode, _int8_decode, INT8_CHUNK)
SIGN = Codec(_sign_encode, _sign_decode, SIGN_CHUNK)


def roundtrip(codec: Codec, x: jax.Array, key=None) -> jax.Array:
  """decode(encode(x)) for a flat x of any length (padded to the codec's block, then cut)."""
  pad = -x.size % codec.block
  return codec.decode(codec.encode(jnp.pad(x, (0, pad)), key))[:x.size]


# ----------------------------------------------------------------------------- helpers

def _ravel(tree):
  """(flat float32 vector of all leaves, unravel: vector -> tree in the leaves' dtypes)."""
  leaves, treedef = jax.tree.flatten(tree)
  flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
  sizes = [x.size for x in leaves]
  cuts = np.cumsum(sizes)[:-1]

  def unravel(v):
    parts = jnp.split(v, cuts)
    return treedef.unflatten(
        [p.reshape(x.shape).astype(x.dtype) for p, x in zip(parts, leaves)])

  return flat, unravel


def _zeros_f32(tree):
  return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), tree)


def _check_axis(axis, replicas):
  size = lax.axis_size(axis)
  if size != replicas:
    raise ConfigError(f"replicas={replicas} but mesh axis {axis!r} has {size} devices; "
                      f"pass replicas={size}")


class ResidualState(NamedTuple):
  residual: Any      # f32 tree like params: what was not sent yet


class TopKState(NamedTuple):
  residual: Any      # v: accumulated, not yet sent
  momentum: Any      # u: DGC local momentum (None without momentum)


class StepState(NamedTuple):
  step: jax.Array    # int32, the same on every replica
  residual: Any      # 'randomk' only ('qsgd' is unbiased and keeps none)


class PowerSGDState(NamedTuple):
  residual: Any
  q: Any             # [cols, rank] per low-rank leaf, [0] for dense leaves; same on all replicas


# ----------------------------------------------------------------------------- compressors

def _none(mean):
  def init(params):
    return optax.EmptyState()

  def update(grads, state, params=None):
    flat, unravel = _ravel(grads)
    return unravel(mean(flat)), state

  return init, update


def _quantised(mean, codec, carry):
  """'int8' / 'sign': error feedback around a deterministic codec."""
  def init(params):
    return ResidualState(_zeros_f32(params))

  def update(grads, state, params=None):
    flat, unravel = _ravel(grads)
    res, unravel_res = _ravel(state.residual)
    acc = flat + res
    sent = roundtrip(codec, acc)
    out = mean(sent, codec=codec) if carry else mean(sent)
    return unravel(out), ResidualState(unravel_res(acc - sent))

  return init, update


def _qsgd(mean, codec, carry, axis, seed):
  def init(params):
    return StepState(jnp.zeros((), jnp.int32), None)

  def update(grads, state, params=None):
    flat, unravel = _ravel(grads)
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), state.step),
                             lax.axis_index(axis))
    out = mean(flat, codec=codec, key=key) if carry else mean(roundtrip(codec, flat, key))
    return unravel(out), StepState(state.step + 1, None)

  return init, update


def _topk(axis, n, aggregator, ratio, momentum):
  def init(params):
    return TopKState(_zeros_f32(params), _zeros_f32(params) if momentum > 0 else None)

  def update(grads, state, params=None):
    leaves, treedef = jax.tree.flatten(grads)
    vs, us = treedef.flatten_up_to(state.residual), (
        treedef.flatten_up_to(state.momentum) if momentum > 0 else [None] * len(leaves))
    idxs, vals, bases, new_v, new_u, start = [], [], [], [], [], 0
    for g, v, u in zip(leaves, vs, us):
      size = g.size
      block, nb, kb = payload.topk_layout(size, ratio)
      g = g.reshape(-1).astype(jnp.float32)
      if u is not None:
        u = momentum * u.reshape(-1) + g
        g = u
      acc = jnp.pad(v.reshape(-1) + g, (0, nb * block - size)).reshape(nb, block)
      _, idx = lax.top_k(jnp.abs(acc), kb)
      val = jnp.take_along_axis(acc, idx, axis=1).astype(jnp.bfloat16)
      rows = jnp.arange(nb)[:, None]
      # What is left: exactly acc - decoded (the bf16 rounding stays where it was sent).
      acc = acc.at[rows, idx].add(-val.astype(jnp.float32))
      new_v.append(acc.reshape(-1)[:size].reshape(v.shape))
      if u is not None:
        u = jnp.pad(u, (0, nb * block - size)).reshape(nb, block).at[rows, idx].set(0)
        new_u.append(u.reshape(-1)[:size].reshape(v.shape))
      idxs.append(idx.astype(jnp.uint16).reshape(-1))
      vals.append(val.reshape(-1))
      bases.append((start + np.arange(nb) * block)[:, None].repeat(kb, 1).reshape(-1))
      start += nb * block
    idx, val, base = jnp.concatenate(idxs), jnp.concatenate(vals), np.concatenate(bases)
    if aggregator == "sparse":
      dense = collectives.sparse_mean(idx, val, start, axis=axis, n=n, base=base)
    else:  # 'psum': the decoded tensor, summed densely
      local = jnp.zeros((start,), jnp.float32).at[base + idx.astype(jnp.int32)].add(
          val.astype(jnp.float32))
      dense = lax.psum(local, axis) / n
    out, pos = [], 0
    for g in leaves:
      block, nb, _ = payload.topk_layout(g.size, ratio)
      out.append(dense[pos:pos + g.size].reshape(g.shape).astype(g.dtype))
      pos += nb * block
    return treedef.unflatten(out), TopKState(
        treedef.unflatten(new_v), treedef.unflatten(new_u) if momentum > 0 else None)

  return init, update


def _randomk(mean, ratio, seed):
  def init(params):
    return StepState(jnp.zeros((), jnp.int32), _zeros_f32(params))

  def update(grads, state, params=None):
    flat, unravel = _ravel(grads)
    res, unravel_res = _ravel(state.residual)
    k, stride = payload.randomk_layout(flat.size, ratio)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)  # shared: same indices
    idx = jnp.arange(k) * stride + jax.random.randint(key, (k,), 0, stride)
    acc = jnp.pad(flat + res, (0, k * stride - flat.size))
    out = jnp.zeros_like(acc).at[idx].set(mean(acc[idx]))[:flat.size]
    res = acc.at[idx].set(0)[:flat.size]
    return unravel(out), StepState(state.step + 1, unravel_res(res))

  return init, update


def _powersgd(mean, rank, seed):
  def init(params):
    def q0(i, x):
      lay = payload.powersgd_layout(jnp.shape(x), rank)
      if lay is None:
        return jnp.zeros((0,), jnp.float32)
      _, b, r = lay
      return jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(seed), i), (b, r))
    leaves, treedef = jax.tree.flatten(params)
    return PowerSGDState(_zeros_f32(params),
                         treedef.unflatten([q0(i, x) for i, x in enumerate(leaves)]))

  def update(grads, state, params=None):
    leaves, treedef = jax.tree.flatten(grads)
    res, qs = treedef.flatten_up_to(state.residual), treedef.flatten_up_to(state.q)
    lays = [payload.powersgd_layout(g.shape, rank) for g in leaves]
    ms = [g.astype(jnp.float32) + e for g, e in zip(leaves, res)]
    ms = [m if lay is None else m.reshape(lay[0], lay[1]) for m, lay in zip(ms, lays)]
    # Pass 1: P = M Q of low-rank leaves and the dense leaves, in one mean.
    first = [m.reshape(-1) if lay is None else (m @ q).reshape(-1)
             for m, q, lay in zip(ms, qs, lays)]
    first = _split(mean(jnp.concatenate(first)), first)
    ps = [None if lay is None else jnp.linalg.qr(p.reshape(lay[0], lay[2]))[0]
          for p, lay in zip(first, lays)]
    # Pass 2: Q = M^T P, one mean.
    q_local = [m.T @ p for m, p, lay in zip(ms, ps, lays) if lay is not None]
    q_mean = iter(_split(mean(jnp.concatenate([q.reshape(-1) for q in q_local])), q_local)
                  if q_local else [])
    q_local = iter(q_local)
    out, new_res, new_q = [], [], []
    for g, m, p, f, q, lay in zip(leaves, ms, ps, first, qs, lays):
      if lay is None:
        out.append(f.reshape(g.shape).astype(g.dtype))
        new_res.append(jnp.zeros(g.shape, jnp.float32))
        new_q.append(q)
        continue
      qm = next(q_mean).reshape(q.shape)
      out.append((p @ qm.T).reshape(g.shape).astype(g.dtype))
      new_res.append((m - p @ next(q_local).T).reshape(g.shape))  # minus what this one sent
      new_q.append(qm)
    return treedef.unflatten(out), PowerSGDState(treedef.unflatten(new_res),
                                                 treedef.unflatten(new_q))

  return init, update


def _split(v, like):
  """Cuts a flat vector into pieces the sizes of the arrays in `like` (flat)."""
  return jnp.split(v, np.cumsum([x.size for x in like])[:-1])


# ----------------------------------------------------------------------------- API

def make(kind: str, *, axis: str, replicas: int, aggregator: str = "psum", ratio: float = 0.01,
         bits: int = 8, rank: int = 4, group: int = 0, momentum: float = 0.0,
         seed: int = 0) -> optax.GradientTransformation:
  """A compressor + replica-mean as an optax transformation (see the module docstring).

  Args:
    kind: one of KINDS.
    axis: the data-parallel mesh axis (manual in the surrounding shard_map).
    replicas: its size.
    aggregator: one of AGGREGATORS; 'topk' takes 'sparse' or 'psum', the others a dense one.
    ratio: fraction of entries sent ('topk', 'randomk').
    bits: QSGD bits per entry, sign included (2..8).
    rank: PowerSGD rank.
    group: devices per node for 'hierarchical'.
    momentum: DGC momentum for 'topk' (0: plain top-k with error feedback).
    seed: randomness shared by all replicas (random-k indices, PowerSGD's initial Q) and,
      folded with the replica index, QSGD's rounding.
  """
  payload.check(kind, aggregator, replicas, ratio, bits, rank, group, momentum)
  carry = aggregator in payload.CARRYING

  def mean(x, codec=None, key=None):
    return collectives.mean(x, axis=axis, n=replicas, aggregator=aggregator, group=group,
                            codec=codec, key=key)

  if kind == "none":
    init, update = _none(mean)
  elif kind in ("int8", "sign"):
    init, update = _quantised(mean, INT8 if kind == "int8" else SIGN, carry)
  elif kind == "qsgd":
    init, update = _qsgd(mean, _qsgd_codec(bits), carry, axis, seed)
  elif kind == "topk":
    init, update = _topk(axis, replicas, aggregator, ratio, momentum)
  elif kind == "randomk":
    init, update = _randomk(mean, ratio, seed)
  else:
    init, update = _powersgd(mean, rank, seed)

  def checked_update(updates, state, params=None):
    _check_axis(axis, replicas)
    return update(updates, state, params)

  return optax.GradientTransformation(init, checked_update)


def _shapes(shapes) -> list[tuple[int, ...]]:
  """Leaf shapes of a pytree of arrays, ShapeDtypeStructs or shape tuples."""
  is_shape = lambda x: isinstance(x, tuple) and all(isinstance(d, int) for d in x)
  return [tuple(x) if is_shape(x) else tuple(jnp.shape(x))
          for x in jax.tree.leaves(shapes, is_leaf=is_shape)]


def dense_bytes(shapes, replicas: int) -> int:
  """Wire bytes per device of the uncompressed float32 psum (the baseline)."""
  return payload.dense_bytes(_shapes(shapes), replicas)


def payload_bytes(kind: str, shapes, *, replicas: int, aggregator: str = "psum",
                  ratio: float = 0.01, bits: int = 8, rank: int = 4, group: int = 0) -> int:
  """Wire bytes each device sends per `update` for gradients of these leaf shapes (a pytree
  of arrays, ShapeDtypeStructs or shape tuples): payload.payload_bytes."""
  return payload.payload_bytes(kind, _shapes(shapes), replicas=replicas, aggregator=aggregator,
                               ratio=ratio, bits=bits, rank=rank, group=group)
