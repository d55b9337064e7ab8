"""Gradient compressors and ring aggregators on 8 virtual devices (conftest sets XLA_FLAGS).

Every compressor runs under one `shard_map` manual over 'data'; per-replica inputs and outputs
are stacked on a leading [8] dim, so the tests also see that the mean is identical everywhere.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, PartitionSpec as P

from rec_llm.parallel import collectives, compression, hlo_stats, payload
from tests import numerics
from tests.numerics import U32, U_BF16

N = 8
MESH = jax.make_mesh((N,), ("data",), axis_types=(AxisType.Auto,))
MESH_DT = jax.make_mesh((4, 2), ("data", "tensor"), axis_types=(AxisType.Auto,) * 2)


def _grads(seed, shapes):
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  return {k: jax.random.normal(key, (N,) + s) for key, (k, s) in zip(keys, shapes.items())}


def _per_replica(tree):
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (N,) + jnp.shape(x)), tree)


def _stepper(comp):
  """jit(shard_map(comp.update)) on stacked [N, ...] grads and states."""
  def f(g, s):
    out, s = comp.update(*jax.tree.map(lambda a: a[0], (g, s)))
    return jax.tree.map(lambda a: a[None], (out, s))
  return jax.jit(jax.shard_map(f, mesh=MESH, in_specs=P("data"), out_specs=P("data")))


def _np(tree):
  return jax.tree.map(np.asarray, tree)


def _same_on_replicas(out):
  for x in jax.tree.leaves(out):
    np.testing.assert_array_equal(x, np.broadcast_to(x[:1], x.shape))


def test_ring_and_hierarchical_equal_psum():
  x = jax.random.normal(jax.random.PRNGKey(0), (N, 37, 5))  # 185: not a multiple of 8
  algos = [("ring", 0), ("hierarchical", 2), ("hierarchical", 4)]

  def f(a, n, algos):
    a = a[0]
    outs = [collectives.mean(a, axis="data", n=n, aggregator=agg, group=g) for agg, g in algos]
    return jnp.stack([collectives.mean(a, axis="data", n=n)] + outs)[None]

  y = jax.jit(jax.shard_map(lambda a: f(a, N, algos), mesh=MESH, in_specs=P("data"),
                            out_specs=P("data")))(x)
  ref = np.asarray(x, np.float64).mean(0)
  # Each is the mean of the same 8 float32 numbers, summed in another order: within the
  # worst-case error of an 8-term sum of each (the division by n is exact, n = 2^3).
  bound = 2 * numerics.sum_bound(x) / N
  for j in range(len(algos) + 1):
    numerics.check_close(f"algorithm {j} vs exact mean", y[0, j], ref, bound / 2)
    numerics.check_close(f"algorithm {j} vs psum", y[:, j], np.broadcast_to(y[:1, 0], y[:, j].shape),
                         bound)
  _same_on_replicas(y)

  # data=4 x tensor=2: the two tensor ranks hold different arrays and reduce independently.
  spec = P(("data", "tensor"))
  y = jax.jit(jax.shard_map(lambda a: f(a, 4, algos[:2]), mesh=MESH_DT, in_specs=spec,
                            out_specs=spec))(x)
  y = np.asarray(y).reshape(4, 2, 3, 37, 5)
  xs = np.asarray(x, np.float64).reshape(4, 2, 37, 5)
  ref, bound = xs.mean(0), numerics.sum_bound(xs) / 4  # [tensor, ...]
  for d in range(4):
    for j in range(3):
      numerics.check_close(f"data=4 x tensor=2, replica {d}, algorithm {j}", y[d, :, j], ref,
                           bound)


def _powersgd_full_rank_bound(mean, q0, n):
  """Spectral-norm bound on |PowerSGD at full rank - M| for M [a, b], one power step from Q0.

  In exact arithmetic P = M Q0 spans range(M) (Q0 [b, r] has full row rank r = rank M),
  so orthonormalising P and projecting M onto it returns M. In float32 the product and the
  n-replica mean of P err by E with ||E|| <= u (sqrt(b) + log2 n) ||M|| ||Q0|| (a b-term
  dot product per entry, probabilistic growth; the mean's log2 n pairwise sums). P - E =
  M Q0, so M = (P - E) Q0^+ and the part of M outside range(P) is at most
  ||E|| ||Q0^+||: the error is u (sqrt(b) + log2 n) cond(Q0) ||M||. A random Gaussian Q0
  is ill-conditioned when square (cond ~ 430 for the [64, 64] Q0 below), which is why
  one fixed absolute tolerance cannot serve. The Householder QR and the final products
  add O(u sqrt(b)) ||M||, far below this term when cond(Q0) >> 1.
  """
  q0 = np.asarray(q0, np.float64)
  return (U32 * (math.sqrt(mean.shape[1]) + math.log2(n)) * np.linalg.cond(q0)
          * np.linalg.norm(mean, 2))


def test_powersgd_full_rank_is_dense_and_low_rank_feeds_back():
  shapes = {"w": (64, 96), "u": (96, 8, 8), "b": (7,)}  # 'b' goes dense
  g = _grads(1, shapes)
  mean = {k: np.asarray(v).mean(0) for k, v in g.items()}
  for rank in (96, 3):
    comp = compression.make("powersgd", axis="data", replicas=N, rank=rank)
    state0 = comp.init(jax.tree.map(lambda x: x[0], g))
    state = _per_replica(state0)
    step = _stepper(comp)
    out, state = _np(step(g, state))
    _same_on_replicas((out, state.q))
    if rank == 96:
      for k in shapes:
        lay = payload.powersgd_layout(shapes[k], rank)
        if lay is None:  # sent dense: a plain 8-term mean
          numerics.check_close(f"{k} dense", out[k][0], mean[k], numerics.sum_bound(g[k]) / N)
          continue
        a, b, _ = lay
        err = np.linalg.norm((out[k][0] - mean[k]).reshape(a, b).astype(np.float64), 2)
        numerics.check(f"{k} full rank vs dense mean (spectral norm)", err,
                       _powersgd_full_rank_bound(mean[k].reshape(a, b), state0.q[k], N))
    else:  # what was not sent is in the residuals: mean(sent) + mean(residual) = mean(grad)
      for k in shapes:
        # residual_i = M_i - P Q_i^T (1 rounding each side), numpy's 8-term mean of them
        # (N - 1 roundings), the rank-r products P Q^T (r terms), the final sum: each error
        # is a few u times the largest |M_i| of the entry.
        scale = np.abs(np.asarray(g[k])).max(0) + np.abs(out[k][0])
        numerics.check_close(f"{k} sent + residual", out[k][0] + state.residual[k].mean(0),
                             mean[k], numerics.gamma(N + rank + 3) * scale)
      assert np.abs(state.residual["w"]).max() > 0.1
      assert state.q["w"].shape == (N, 96, 3) and state.q["b"].shape == (N, 0)
      out2, _ = _np(step(g, jax.tree.map(jnp.asarray, state)))  # warm-started Q, 2nd step
      _same_on_replicas(out2)


def test_qsgd_unbiased():
  bits, draws = 4, 2000
  codec = compression._qsgd_codec(bits)
  x = jax.random.normal(jax.random.PRNGKey(2), (512,))
  keys = jax.random.split(jax.random.PRNGKey(3), draws)
  dec = jax.jit(jax.vmap(lambda k: codec.decode(codec.encode(x, k))))(keys)
  est = np.asarray(dec).mean(0)
  # Each entry rounds to one of two levels delta = max|chunk| / (2^(bits-1)-1) apart, so its
  # variance is at most delta^2 / 4; allow 4 standard errors of the mean of `draws` draws.
  delta = np.repeat(np.abs(np.asarray(x)).reshape(-1, payload.QSGD_CHUNK).max(1), 256) / 7
  np.testing.assert_array_less(np.abs(est - np.asarray(x)), 4 * delta / 2 / math.sqrt(draws))
  assert np.abs(np.asarray(dec[0]) - np.asarray(x)).max() > 0.01  # it does round

  # Through the ring (re-quantised partial sums): unbiased too, per-replica keys, one mean.
  comp = compression.make("qsgd", axis="data", replicas=N, aggregator="ring", bits=8)
  g = _grads(4, {"w": (300,)})
  out, state = _np(_stepper(comp)(g, _per_replica(comp.init({"w": g["w"][0]}))))
  _same_on_replicas(out)
  assert (state.step == 1).all()
  numerics.check_close("qsgd through the ring", out["w"][0], np.asarray(g["w"]).mean(0),
                       numerics.ring_codec_bound(g["w"], 127, True, payload.QSGD_CHUNK))


@pytest.mark.parametrize("kind,aggregator", [
    ("topk", "sparse"), ("randomk", "ring"), ("int8", "psum"), ("sign", "psum")])
def test_error_feedback_invariant(kind, aggregator):
  shapes = {"w": (40, 30), "b": (30,)}
  comp = compression.make(kind, axis="data", replicas=N, aggregator=aggregator, ratio=0.05)
  step = _stepper(comp)
  g1, g2 = _grads(5, shapes), _grads(6, shapes)
  _, state = step(g1, _per_replica(comp.init(jax.tree.map(lambda x: x[0], g1))))
  out, new = _np(step(g2, state))
  old, g2 = _np(state.residual), _np(g2)
  _same_on_replicas(out)
  acc = {k: g2[k] + old[k] for k in shapes}
  sent = {k: acc[k] - new.residual[k] for k in shapes}  # residual + sent == grad + residual
  for k in shapes:
    assert np.abs(old[k]).max() > 0  # the first step left something behind
    # `sent` recomputed here from the state (two float32 roundings of |acc| each), then the
    # 8-term mean of it in either program: gamma(N + 2) of the entries' magnitudes.
    numerics.check_close(f"{k} mean of sent", out[k][0], sent[k].mean(0),
                         numerics.gamma(N + 2) * 2 * (np.abs(acc[k]) + np.abs(sent[k])).mean(0))
    if kind == "topk":  # per leaf one block, ceil(0.05 * size) entries, bf16 values
      assert ((sent[k] != 0).reshape(N, -1).sum(1) <= math.ceil(0.05 * g2[k][0].size)).all()
      np.testing.assert_array_equal(sent[k], sent[k].astype(jnp.bfloat16).astype(np.float32))
  flat = lambda t, r: np.concatenate([t[k][r].reshape(-1) for k in sorted(shapes)])
  if kind == "randomk":  # same indices on every replica, residual zero there
    support = flat(sent, 0) != 0
    k = payload.randomk_layout(support.size, 0.05)[0]
    assert k - 1 <= support.sum() <= k  # the last stretch may pick a padding entry
    for r in range(N):
      assert ((flat(sent, r) != 0) == support).all()
      assert (flat(new.residual, r)[support] == 0).all()
  if kind in ("int8", "sign"):  # sent is exactly what the codec makes of grad + residual
    codec = compression.INT8 if kind == "int8" else compression.SIGN
    for r in (0, N - 1):
      # acc in the update's (sorted-key) flat order
      want = compression.roundtrip(codec, jnp.asarray(flat(acc, r)))
      # acc - (acc - sent) here vs sent in the step: two roundings of the operands' size.
      numerics.check_close(f"{kind} codec, replica {r}", flat(sent, r), np.asarray(want),
                           numerics.gamma(2) * (np.abs(flat(acc, r)) + np.abs(np.asarray(want))))


def test_dgc_ratio_one_is_dense_mean_and_momentum_masks():
  shapes = {"w": (40, 30), "b": (30,)}
  g = _grads(7, shapes)
  mean = {k: np.asarray(v).mean(0) for k, v in g.items()}
  comp = compression.make("topk", axis="data", replicas=N, aggregator="sparse", ratio=1.0)
  out, state = _np(_stepper(comp)(g, _per_replica(comp.init(jax.tree.map(lambda x: x[0], g)))))
  _same_on_replicas(out)
  for k in shapes:  # dense up to the bf16 rounding of the values, which stays in the residual
    mean_abs = np.abs(np.asarray(g[k])).mean(0)  # the sum's |terms| / N
    numerics.check_close(f"{k} ratio 1 vs dense", out[k][0], mean[k],
                         U_BF16 * mean_abs + numerics.gamma(2 * N) * mean_abs)
    numerics.check_close(f"{k} ratio 1 sent + residual", out[k][0] + state.residual[k].mean(0),
                         mean[k], numerics.gamma(N + 3) * 2 * mean_abs)

  comp = compression.make("topk", axis="data", replicas=N, aggregator="sparse", ratio=0.1,
                          momentum=0.9)
  step = _stepper(comp)
  g2 = _grads(8, shapes)
  _, s1 = step(g, _per_replica(comp.init(jax.tree.map(lambda x: x[0], g))))
  _, s2 = _np(step(g2, s1))
  s1, g2 = _np(s1), _np(g2)
  for k in shapes:
    u = 0.9 * s1.momentum[k] + g2[k]  # local momentum, then accumulated into v
    sent = s1.residual[k] + u - s2.residual[k]
    # Recomputed here, u and v differ from the step's by a few roundings (numpy vs XLA, with
    # or without FMA): where nothing was sent, `sent` is that noise, below `noise`.
    noise = numerics.gamma(4) * (np.abs(s1.residual[k]) + 0.9 * np.abs(s1.momentum[k])
                                 + np.abs(g2[k]) + np.abs(s2.residual[k]))
    mask = np.abs(sent) > noise
    assert 0 < mask.mean() <= 0.11
    np.testing.assert_array_equal(s2.momentum[k][mask], 0)  # momentum factor masking
    numerics.check_close(f"{k} momentum kept", s2.momentum[k][~mask], u[~mask], noise[~mask])
    # bf16 keeps 8 significant bits: what stays behind where sent is its rounding error,
    # at most u_bf16 |rounded value|.
    numerics.check(f"{k} bf16 residual", np.abs(s2.residual[k][mask]),
                   U_BF16 * np.abs(sent[mask]) + noise[mask])


@pytest.mark.parametrize("name,codec", [("int8", compression.INT8), ("sign", compression.SIGN),
                                        ("qsgd", compression._qsgd_codec(3))])
def test_encoded_bytes_are_the_codecs(name, codec):
  """payload.encoded_bytes (JAX-free, the simulator's) against what each codec returns."""
  assert codec.block == payload.CODEC_CHUNK[name]
  for m in (codec.block, 7 * codec.block):
    out = jax.eval_shape(codec.encode, jax.ShapeDtypeStruct((m,), jnp.float32),
                         jax.ShapeDtypeStruct((2,), jnp.uint32))
    assert payload.encoded_bytes(name, m) == sum(a.size * a.dtype.itemsize
                                                 for a in jax.tree.leaves(out))


SHAPES = {"b": (96,), "e": (300, 64), "w": (256, 96)}


@pytest.mark.parametrize("kind,aggregator,group", [
    ("none", "ring", 0), ("int8", "ring", 0), ("int8", "hierarchical", 2), ("sign", "ring", 0),
    ("topk", "sparse", 0)])
def test_measured_bytes_match_payload_bytes(kind, aggregator, group):
  kw = dict(aggregator=aggregator, ratio=0.01, group=group)
  comp = compression.make(kind, axis="data", replicas=N, **kw)
  g = _grads(9, SHAPES)
  step = _stepper(comp)
  state = _per_replica(comp.init(jax.tree.map(lambda x: x[0], g)))
  stats = hlo_stats.collective_bytes(step.lower(g, state).compile().as_text(), {"data": N})
  measured = payload.hlo_wire_bytes(stats["by_axis_kind"]["data"], N)
  analytic = compression.payload_bytes(kind, SHAPES, replicas=N, **kw)
  dense = compression.dense_bytes(SHAPES, N)
  print(f"{kind}/{aggregator}: measured {measured:.0f} B, analytic {analytic} B, "
        f"dense psum {dense} B, ratio {dense / analytic:.1f}")
  assert measured == analytic  # exact: the compressor alone has no other collective
  out, _ = _np(step(g, state))
  _same_on_replicas(out)
  if kind in ("none", "int8"):
    # Per entry: the 8-term sum's rounding, plus for int8 the ring's quantised partial sums
    # (half a level of each block's scale per encoding); compared in norm per leaf.
    flat = np.concatenate([np.asarray(g[k]).reshape(N, -1) for k in sorted(SHAPES)], axis=1)
    bound = (numerics.sum_bound(flat) / N if kind == "none" else
             numerics.ring_codec_bound(flat, 127, False, payload.INT8_CHUNK))
    pos = 0
    for k in sorted(SHAPES):
      ref, size = np.asarray(g[k], np.float64).mean(0), math.prod(SHAPES[k])
      numerics.check(f"{kind}/{aggregator} {k} (norm)", np.linalg.norm(out[k][0] - ref),
                     np.linalg.norm(bound[pos:pos + size]))
      pos += size


@pytest.mark.parametrize("kwargs,needle", [
    (dict(kind="topk", ratio=0.0), "ratio=0.0 is outside (0, 1]"),
    (dict(kind="randomk", ratio=1.5), "ratio=1.5 is outside (0, 1]"),
    (dict(kind="zip"), "unknown compression kind 'zip'"),
    (dict(kind="none", aggregator="tree"), "unknown aggregator 'tree'"),
    (dict(kind="int8", aggregator="sparse"), "use one of ('psum', 'ring', 'hierarchical')"),
    (dict(kind="powersgd", rank=0), "rank=0 must be a positive integer"),
    (dict(kind="qsgd", bits=1), "bits=1 is outside [2, 8]"),
    (dict(kind="qsgd", bits=9), "bits=9 is outside [2, 8]"),
    (dict(kind="none", aggregator="hierarchical", group=3), "group=3 must be a positive divisor"),
])
def test_bad_arguments_name_the_fix(kwargs, needle):
  kind = kwargs.pop("kind")
  with pytest.raises(ValueError) as e:
    compression.make(kind, axis="data", replicas=N, **kwargs)
  assert needle in str(e.value)
