import collections
import dataclasses
import functools
import math
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from experiments.configs import large_1b
from rec_llm.models import arithmetic, seq_transformer
from rec_llm.models.seq_transformer import SeqTransformer, count_params
from rec_llm.parallel import mesh as mesh_lib
from rec_llm.parallel import sharding, vocab_parallel
from rec_llm.train import config_check, optimizer, trainer
from rec_llm.train.step import init_state
from tests import numerics
from tests.helpers import LAYOUT_RTOL, tiny_config


def _abstract(config, tensor):
  config.mesh.update(data=-1, tensor=tensor, pipe=1)
  config_check.check(config, 8)
  mc = config_check.check_model(config, config.data.num_items, tensor)
  model, tx = SeqTransformer(mc), optimizer.make(config.train)
  abstract = jax.eval_shape(functools.partial(init_state, model, tx, mc.max_len), jax.random.PRNGKey(0))
  mesh = mesh_lib.build_mesh(dict(data=-1, tensor=tensor, pipe=1))
  return mc, abstract, sharding.tree_shardings(abstract, mesh)


def hstu_config(**mesh):
  c = tiny_config(**mesh)
  c.model.block = "hstu"
  return c


@pytest.mark.parametrize("get_config,tensor", [(tiny_config, 1), (tiny_config, 2),
                                               (hstu_config, 1), (hstu_config, 4),
                                               (large_1b.get_config, 8)])
def test_param_arithmetic_matches_init(get_config, tensor):
  """rec_llm/models/arithmetic.py (JAX-free: the simulator's) against the real init: every
  leaf's path and shape, whole and on one device under the parameter shardings."""
  mc, abstract, shardings = _abstract(get_config(), tensor)
  params = nn.meta.unbox(abstract.params)
  path = lambda kp: "/".join(k.key for k in kp)
  whole = {path(kp): tuple(x.shape) for kp, x in jax.tree_util.tree_leaves_with_path(params)}
  local = jax.tree.map(lambda x, s: s.shard_shape(x.shape), params, shardings.params)
  local = {path(kp): tuple(x) for kp, x in jax.tree_util.tree_leaves_with_path(
      local, is_leaf=lambda x: isinstance(x, tuple))}
  assert list(whole) == list(arithmetic.param_shapes(mc))  # same leaves, same order
  assert whole == arithmetic.param_shapes(mc)
  assert local == arithmetic.param_shapes(mc, tensor)
  assert sum(count_params(mc).values()) == sum(math.prod(s) for s in whole.values())
  per_device = sum(math.prod(s) for s in local.values())
  assert per_device == (mc.num_layers * arithmetic.block_params(mc, tensor)
                        + arithmetic.shared_params(mc, tensor))


def test_1b_model_initialises_abstractly_with_sharded_item_table():
  mc, abstract, shardings = _abstract(large_1b.get_config(), 8)
  counts = count_params(mc)
  assert counts["blocks"] > 1e9 and counts["embedding"] > 4e9
  table = shardings.params["item_embedding"]
  assert table.spec == P("tensor", None)
  # Optimizer moments of the table are sharded the same way: never replicated.
  specs = [s.spec for s in jax.tree.leaves(shardings.opt_state) if hasattr(s, "spec")]
  assert specs.count(P("tensor", None)) == 2  # Adam mu and nu
  mlp = shardings.params["blocks"]["mlp_in"]["kernel"]
  assert mlp.spec == P(None, None, "tensor")


def _hlo(data, tensor):
  run = trainer.build(tiny_config(data=data, tensor=tensor),
                      jax.devices()[: data * tensor])
  return run.model_cfg, run.compile().executables[run.model_cfg.max_len].as_text()


@pytest.mark.parametrize("data,tensor", [(2, 4), (1, 8)])
def test_no_device_holds_unsharded_logits(data, tensor):
  """The full softmax scores a chunk of positions at a time (vocab_parallel.CHUNK_ROWS)
  against the device's own table rows: no array ends in the whole vocabulary."""
  mc, text = _hlo(data, tensor)
  _, rows = vocab_parallel.chunking(16 // data * mc.max_len)
  v = mc.vocab_size
  assert re.search(rf"f32\[{rows},{v // tensor}\]", text), "local logits block not found"
  assert not re.search(rf"\[(\d+,)+{v}\]", text), "a [..., vocab] array is unsharded"


def test_single_device_hlo_has_full_logits():
  """Positive control for the pattern above."""
  mc, text = _hlo(1, 1)
  _, rows = vocab_parallel.chunking(16 * mc.max_len)
  assert re.search(rf"f32\[{rows},{mc.vocab_size}\]", text)


def test_vocab_parallel_ops_match_dense_reference():
  rng = np.random.default_rng(0)
  vocab, d, num_valid = 64, 8, 50
  table = rng.normal(size=(vocab, d)).astype(np.float32)
  hidden = rng.normal(size=(4, 5, d)).astype(np.float32)
  targets = rng.integers(1, num_valid, size=(4, 5)).astype(np.int32)
  targets[0, 0] = 0  # padding target: excluded from the softmax, value unused
  mesh = mesh_lib.build_mesh(dict(data=2, tensor=4, pipe=1))
  with sharding.activate(mesh):
    emb = jax.jit(vocab_parallel.embed_lookup)(table, targets)
    nll, rank = jax.jit(vocab_parallel.softmax_xent, static_argnums=3)(hidden, table, targets, num_valid)
  np.testing.assert_array_equal(emb, table[targets])  # one row plus exact zeros per shard
  # Reference in float64. The kernel's float32 logits err by at most prob(d) sum|h_i t_i|
  # each (a d-term dot product), its sum of exps over the vocabulary by prob(vocab)
  # relative, which is that much absolute error in the log; the rest is a few roundings.
  h64, t64 = hidden.astype(np.float64), table.astype(np.float64)
  logits = h64 @ t64.T
  logit_err = numerics.prob(d) * (np.abs(h64) @ np.abs(t64).T)
  logits[..., 0] = -np.inf
  logits[..., num_valid:] = -np.inf
  lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  tgt = np.take_along_axis(logits, targets[..., None], -1)[..., 0]
  tgt_err = np.take_along_axis(logit_err, targets[..., None], -1)[..., 0]
  ok = targets != 0
  bound = logit_err.max(-1) + tgt_err + numerics.prob(vocab) + numerics.gamma(4) * (
      np.abs(lse) + np.abs(tgt))
  numerics.check_close("nll", np.asarray(nll)[ok], (lse - tgt)[ok], bound[ok])
  # A rank counts items scoring above the target: exact except for items whose logit lies
  # within the two logits' error of the target's (none, usually).
  gap = logits[ok] - tgt[ok][:, None]  # (padding targets have no rank to check)
  near = logit_err[ok] + tgt_err[ok][:, None]
  lo, hi = (gap > near).sum(-1), (gap > -near).sum(-1) - 1  # the target itself is in hi
  r = np.asarray(rank)[ok]
  assert ((lo <= r) & (r <= hi)).all(), (r, lo, hi)


@pytest.mark.parametrize("mesh_shape", [None, (2, 4), (1, 8)])
@pytest.mark.parametrize("chunk_rows", [3, 256])
def test_fused_softmax_gradients_match_autodiff(mesh_shape, chunk_rows):
  """The full softmax's hand-written gradients against autodiff of a float64 dense
  cross-entropy: hidden-state and table gradients, on one device and vocab-parallel, in
  chunks of 3 (padding rows in the last) or in one; per position (a backward pass that
  recomputes the logits) and `total` (the sum over real targets, its gradient computed in
  the forward pass). Tolerance: 1e-5 of the largest gradient (float32 sums of at most 64
  terms)."""
  rng = np.random.default_rng(0)
  vocab, d, num_valid = 64, 8, 50
  table = rng.normal(size=(vocab, d)).astype(np.float32)
  hidden = rng.normal(size=(4, 5, d)).astype(np.float32)
  targets = rng.integers(1, num_valid, size=(4, 5)).astype(np.int32)
  targets[0, 0] = 0
  weight = np.arange(20.0).reshape(4, 5) * (targets != 0)  # distinct per position

  def ref(h, t, weight):
    logits = jnp.where((jnp.arange(vocab) > 0) & (jnp.arange(vocab) < num_valid), h @ t.T, -jnp.inf)
    nll = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jnp.sum(jnp.where(targets != 0, nll, 0) * weight)

  xent = functools.partial(vocab_parallel.softmax_xent, targets=targets, num_valid=num_valid,
                           chunk_rows=chunk_rows)
  losses = {"per position": lambda h, t: jnp.sum(xent(h, t)[0] * weight),
            "total": lambda h, t: xent(h, t, total=True)[0]}
  weights = {"per position": weight, "total": np.ones_like(weight)}
  mesh = mesh_shape and mesh_lib.build_mesh(dict(data=mesh_shape[0], tensor=mesh_shape[1], pipe=1))
  for kind, loss in losses.items():
    with jax.enable_x64():
      want = jax.value_and_grad(ref, (0, 1))(hidden.astype(np.float64), table.astype(np.float64),
                                             weights[kind])
    if mesh is None:
      got = jax.jit(jax.value_and_grad(loss, (0, 1)))(hidden, table)
    else:
      with sharding.activate(mesh):
        got = jax.jit(jax.value_and_grad(loss, (0, 1)))(hidden, table)
    numerics.check_close(f"{kind} loss", float(got[0]), float(want[0]), 1e-5 * abs(float(want[0])))
    for name, g, w in zip(("hidden", "table"), got[1], want[1]):
      w = np.asarray(w)
      numerics.check_close(f"{kind} d {name}", np.asarray(g), w, 1e-5 * np.abs(w).max())


@pytest.mark.parametrize("block", ["transformer", "hstu"])
def test_padding_does_not_leak_into_real_positions(block):
  """Changing what sits under padded inputs changes nothing at real positions."""
  mc = dataclasses.replace(config_check.model_config(tiny_config(), 300), block=block)
  model = SeqTransformer(mc)
  ids = jnp.array([[0, 0, 0, 5, 7, 9, 11, 3, 4, 8, 2, 6]], jnp.int32)
  params = model.init(jax.random.PRNGKey(0), ids)["params"]
  params = jax.tree.map(lambda b: b.value if hasattr(b, "value") else b, params,
                        is_leaf=lambda b: hasattr(b, "value"))
  h1, _ = model.apply({"params": params}, ids)
  # Same real suffix, but a different number of leading pads is a different sequence;
  # instead perturb the pad *embedding row*: padded slots are zeroed and masked out as keys.
  params2 = dict(params)
  params2["item_embedding"] = params["item_embedding"].at[0].set(100.0)
  h2, _ = model.apply({"params": params2}, ids)
  # Exactly: padded inputs are multiplied by 0 and masked keys replaced by -1e30 (whose
  # exp is exactly 0; HSTU's weights by 0), so the real positions compute on the very same
  # numbers.
  np.testing.assert_array_equal(h1[0, 3:], h2[0, 3:])


@pytest.mark.parametrize("block", ["transformer", "hstu"])
def test_short_window_equals_left_padded_full_window(block):
  """Length buckets are exact: positions count back from the latest item."""
  mc = dataclasses.replace(config_check.model_config(tiny_config(), 300), block=block)
  model = SeqTransformer(mc)
  short = jnp.array([[0, 5, 7, 9, 11], [4, 8, 2, 6, 1]], jnp.int32)
  full = jnp.pad(short, ((0, 0), (mc.max_len - 5, 0)))
  params = nn_unbox(model.init(jax.random.PRNGKey(0), full)["params"])
  h_short, _ = model.apply({"params": params}, short)
  h_full, _ = model.apply({"params": params}, full)
  # The same sums, over 5 keys or over 12 of which 7 are exact zeros, in matmuls of other
  # shapes (so other blockings): a reordering, on hidden values of norm ~1 per entry
  # after the final LayerNorm (an absolute floor of LAYOUT_RTOL at values near 0).
  bound = lambda h: LAYOUT_RTOL * np.maximum(np.abs(np.asarray(h)), 1.0)
  numerics.check_close("window", h_short[:, 1:], h_full[:, -4:], bound(h_full[:, -4:]))
  numerics.check_close("last pad", h_short[1, 0], h_full[1, -5], bound(h_full[1, -5]))


def test_default_query_blocks_are_about_query_block_long():
  mc = config_check.model_config(tiny_config(), 300)
  assert mc.causal_blocks == 0
  assert seq_transformer.query_blocks(mc, 200) == [0, 50, 100, 150, 200]
  assert seq_transformer.query_blocks(mc, 100) == [0, 50, 100]
  assert seq_transformer.query_blocks(mc, 25) == [0, 25]
  assert seq_transformer.query_blocks(dataclasses.replace(mc, causal_blocks=3), 7) == [0, 2, 4, 7]


@pytest.mark.parametrize("block", ["transformer", "hstu"])
def test_causal_query_blocks_compute_the_same(block):
  """Attention in 2 or 3 query blocks (each scoring only the keys up to its end) gives the
  1-block model's hidden states and gradients at real positions: the skipped scores were
  masked, so only the matmuls' blocking differs (LAYOUT_RTOL: elementwise for the states, as
  in the test above; in relative norm per parameter for the gradients, as between layouts). (A
  padding query sees no valid key; what it averages is unused, and differs.)"""
  mc = dataclasses.replace(config_check.model_config(tiny_config(), 300), block=block)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 300, size=(3, mc.max_len)), jnp.int32)
  ids = ids.at[0, :5].set(0)  # left padding
  params = nn_unbox(SeqTransformer(mc).init(jax.random.PRNGKey(0), ids)["params"])
  # A random linear read-out: a sum of squares after the final LayerNorm is nearly constant,
  # and its gradients would be all cancellation.
  w = jax.random.normal(jax.random.PRNGKey(1), ids.shape + (mc.d_model,))

  def run(blocks):
    model = SeqTransformer(dataclasses.replace(mc, causal_blocks=blocks))
    real = lambda p: jnp.where((ids != 0)[..., None], model.apply({"params": p}, ids)[0], 0)
    return real(params), jax.grad(lambda p: jnp.sum(real(p) * w))(params)

  h1, g1 = run(1)
  bound = lambda x: LAYOUT_RTOL * np.maximum(np.abs(np.asarray(x)), 1.0)
  for blocks in (2, 3):
    h, g = run(blocks)
    numerics.check_close(f"{blocks} blocks", h, h1, bound(h1))
    numerics.check_tree_rel(f"{blocks} blocks, gradients", g, g1, LAYOUT_RTOL)  # relative norm


def nn_unbox(tree):
  import flax.linen as nn
  return nn.meta.unbox(tree)


def test_cosine_scores_match_reference_and_shard():
  """model.temperature > 0: scores are cos(hidden, item) / t, the same on 1 and 4x2 devices."""
  c = tiny_config(data=1, tensor=1)
  c.model.temperature = 0.1
  run1 = trainer.build(c, jax.devices()[:1])
  batch = run1.batches(0)
  hidden, table = jax.jit(lambda p, x: run1.model.apply({"params": p}, x))(
      run1.state.params, batch["inputs"])
  scores = np.asarray(hidden @ table.T)
  assert np.abs(scores).max() <= 1 / 0.1 + 1e-4  # |cos| <= 1
  c8 = tiny_config(data=4, tensor=2)
  c8.model.temperature = 0.1
  run8 = trainer.build(c8)
  losses = []
  for run in (run1, run8):
    state, m = run.compile()(run.state, run.batches(0))
    losses.append(float(m["loss"]))
  numerics.check_close("loss", losses[1], losses[0], LAYOUT_RTOL * abs(losses[0]))


@pytest.mark.parametrize("bits", ["threefry", "hash"])
def test_byte_dropout_drops_its_rounded_rate_and_keeps_the_expectation(bits):
  """seq_transformer.Dropout (8 random bits an element): drops round(rate * 256) / 256 of the
  elements, independently of their place in a 4-element word, scales the kept ones so the
  mean is unchanged, draws anew on each call, and is the identity when deterministic. An odd
  last axis (203) checks the word padding. Tolerances: 5 standard deviations of a binomial
  over the 2.6M elements (over 650k per word position)."""
  Dropout = seq_transformer.Dropout
  x = jnp.ones((64, 200, 203))
  drop = Dropout(0.2, deterministic=False, bits=bits)
  y1, y2 = (np.asarray(drop.apply({}, x, rngs={"dropout": jax.random.PRNGKey(s)})) for s in (0, 1))
  p, n = 51 / 256, x.size
  numerics.check("dropped fraction", abs(np.mean(y1 == 0) - p), 5 * math.sqrt(p * (1 - p) / n))
  numerics.check("mean", abs(y1.mean() - 1), 5 * math.sqrt(p / (1 - p) / n))
  np.testing.assert_allclose(y1[y1 != 0], 256 / 205, rtol=1e-6)
  for j in range(4):  # each byte of a word is an independent draw
    col = y1[..., j:200:4] == 0
    numerics.check(f"byte {j}", abs(col.mean() - p), 5 * math.sqrt(p * (1 - p) / col.size))
  both = (y1[..., :-4] == 0) & (y1[..., 4:] == 0)  # neighbouring words: independent draws
  numerics.check("both dropped", abs(both.mean() - p * p), 5 * math.sqrt(p * p / both.size))
  assert 0.5 < np.mean((y1 == 0) != (y2 == 0)) / (2 * p * (1 - p)) < 1.5  # another draw
  np.testing.assert_array_equal(Dropout(0.2, deterministic=True).apply({}, x), x)
  np.testing.assert_array_equal(Dropout(0.001, deterministic=False).apply(
      {}, x, rngs={"dropout": jax.random.PRNGKey(0)}), x)  # rounds to 0: nothing dropped


def test_hash_bits_are_the_same_on_every_sharding():
  """seq_transformer.hash_bits indexes the global array: computed sharded over 8 devices (the
  batch axis, or batch x heads), the bits are one device's, and a new key draws new bits."""
  from jax.sharding import Mesh, NamedSharding
  hash_bits = seq_transformer.hash_bits
  shape, key = (8, 4, 16, 5), jax.random.PRNGKey(3)
  ref = np.asarray(jax.jit(hash_bits, static_argnums=1)(key, shape))
  mesh = Mesh(np.asarray(jax.devices()[:8]).reshape(4, 2), ("data", "tensor"))
  for spec in (P("data"), P("data", "tensor")):
    f = jax.jit(hash_bits, static_argnums=1, out_shardings=NamedSharding(mesh, spec))
    np.testing.assert_array_equal(np.asarray(f(key, shape)), ref)
  assert np.mean(np.asarray(hash_bits(jax.random.PRNGKey(4), shape)) == ref) < 0.01


@pytest.mark.parametrize("block", ["transformer", "hstu"])
def test_block_tensor_allreduces_match_the_cost_model(block):
  """The simulator's per-block tensor all-reduces (cost_model.BLOCK_SHAPES, as multiples of
  an [n, d] activation) are the compiled step's: one more unrolled block adds exactly them."""
  from rec_llm.parallel import hlo_stats
  from rec_llm.sim import cost_model

  def tensor_allreduces(layers):
    c = tiny_config(data=1, tensor=2)
    c.model.update(block=block, num_layers=layers, scan_unroll=layers)
    run = trainer.build(c, jax.devices()[:2])
    text = run.compile().executables[run.model_cfg.max_len].as_text()
    return collections.Counter(
        (x.payload, x.count) for x in hlo_stats.collectives(text, dict(data=1, tensor=2, pipe=1))
        if x.axes == "tensor" and x.kind == "all-reduce")

  two, three = tensor_allreduces(2), tensor_allreduces(3)
  act = 16 * 12 * 64 * 4  # rows x seq x d_model x f32 of tiny_config
  shape = cost_model.BLOCK_SHAPES[block]
  want = collections.Counter((k * act, 1) for k in shape["fwd_allreduces"] + shape["bwd_allreduces"])
  assert three - two == want and not two - three
