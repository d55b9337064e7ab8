"""Megatron-style vocabulary parallelism for an item table sharded by rows.

The item table [vocab, embed] is split over the mesh axis that the logical name 'vocab'
maps to. Lookups and the full-softmax cross-entropy run inside `shard_map`, so each
device only ever holds its own [batch, seq, vocab/tensor] block of logits; the softmax
statistics are combined with pmax/psum across the vocab shards.

Both functions take the current mesh from `jax.set_mesh` (see `sharding.activate`) and
fall back to plain single-device code when no mesh is active (e.g. abstract init).
"""

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from rec_llm.parallel import sharding

_NEG = -1e30  # finite "minus infinity": keeps fully-masked rows NaN-free


def _axes():
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  # Axes a surrounding shard_map already made manual (the pipeline's) are local here.
  return sharding.local_axis("vocab"), sharding.local_axis("batch")


def _shard_bounds(table, vaxis):
  rows = table.shape[0]
  start = 0 if vaxis is None else jax.lax.axis_index(vaxis) * rows
  return start, rows


def _psum(x, axis):
  return x if axis is None else jax.lax.psum(x, axis)


def tie(table: jax.Array) -> jax.Array:
  """The item table as a training step's lookup and softmax both take it: one copy per
  'batch' shard, [shards, vocab, embed] split over 'batch' and 'vocab'.

  A table replicated over 'batch' enters each `shard_map` unmapped on that axis, so the
  transpose of each one all-reduces its own gradient over the data replicas: the table's
  two uses would be reduced twice. Per-shard copies come back unreduced from both, are
  added on each device, and this broadcast's transpose reduces their sum once. The copy
  is the device's own table shard (no extra traffic); without a sharded batch it is the
  table itself.
  """
  axes = _axes()
  baxis = None if axes is None else axes[1]
  if baxis is None or jax.sharding.get_abstract_mesh().shape[baxis] == 1:
    return table
  shards = jax.sharding.get_abstract_mesh().shape[baxis]
  copies = jnp.broadcast_to(table[None], (shards,) + table.shape)
  return jax.lax.with_sharding_constraint(copies, P(baxis, axes[0], None))


def _table_spec(table, vaxis, baxis):
  """The shard_map spec of a table as given: [vocab, embed] or `tie`'s per-shard copies."""
  return P(vaxis, None) if table.ndim == 2 else P(baxis, vaxis, None)


def _local_table(tbl):
  return tbl if tbl.ndim == 2 else tbl[0]


def embed_lookup(table: jax.Array, ids: jax.Array) -> jax.Array:
  """table[ids] with table rows sharded over 'vocab'; ids [batch, seq] -> [batch, seq, embed]."""
  axes = _axes()
  if axes is None:
    return jnp.take(_local_table(table), ids, axis=0)
  vaxis, baxis = axes

  def local(tbl, ids):
    tbl = _local_table(tbl)
    start, rows = _shard_bounds(tbl, vaxis)
    rel = ids - start
    hit = (rel >= 0) & (rel < rows)
    x = jnp.take(tbl, jnp.clip(rel, 0, rows - 1), axis=0)
    return _psum(jnp.where(hit[..., None], x, jnp.zeros_like(x)), vaxis)

  return jax.shard_map(
      local, in_specs=(_table_spec(table, vaxis, baxis), P(baxis, None)),
      out_specs=P(baxis, None, None))(table, ids)


def ahead_of_target(scores: jax.Array, ids: jax.Array, target_score: jax.Array,
                    target_id: jax.Array) -> jax.Array:
  """Whether each item ranks ahead of the target (arrays broadcast): the one definition of
  a rank, used by every ranking metric.

  An item is ahead if it scores higher, or equal with a lower id (the order `lax.top_k`
  gives). A score that is not finite never helps the target: a NaN or infinite score of
  the item puts it ahead, and a NaN or infinite target score puts every item ahead, so
  broken parameters rank the target last instead of first (a NaN compares false with
  everything, which would otherwise rank it first). Callers leave the target itself,
  padding ids and excluded items out.
  """
  return (~jnp.isfinite(scores) | ~jnp.isfinite(target_score) | (scores > target_score)
          | ((scores == target_score) & (ids < target_id)))


def softmax_xent(hidden: jax.Array, table: jax.Array, targets: jax.Array,
                 num_valid: int, exclude: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Full-softmax cross-entropy against tied item scores, computed vocab-parallel.

  Args:
    hidden: [batch, seq, embed] final hidden states.
    table: [vocab, embed] item table (rows sharded over 'vocab'), or `tie`'s copies of it.
    targets: [batch, seq] item ids.
    num_valid: ids 1..num_valid-1 are real items; id 0 (padding) and the rows padded onto
      the table for even sharding are excluded from the softmax.
    exclude: optional [batch, n] ids left out of each row's rank (not of the loss), e.g.
      the items the user has seen; 0 is ignored, and a row's target is never left out.

  Returns:
    (nll, rank), both [batch, seq]: the negative log-likelihood of each target and its
    0-based rank among the valid items (`ahead_of_target`: higher scores, equal scores of
    lower id, and any non-finite score), for hit-rate and ranking metrics.
  """
  axes = _axes()
  vaxis, baxis = axes if axes is not None else (None, None)

  def local(h, tbl, tgt, ex=None):
    tbl = _local_table(tbl)
    start, rows = _shard_bounds(tbl, vaxis)
    logits = jnp.einsum("bsd,vd->bsv", h, tbl, preferred_element_type=jnp.float32)
    col = start + jnp.arange(rows)
    valid = (col > 0) & (col < num_valid)
    logits = jnp.where(valid, logits, _NEG)
    m = jax.lax.stop_gradient(logits.max(-1))
    if vaxis is not None:
      m = jax.lax.pmax(m, vaxis)
    sumexp = _psum(jnp.exp(logits - m[..., None]).sum(-1), vaxis)
    lse = jnp.log(sumexp) + m
    rel = tgt - start
    hit = (rel >= 0) & (rel < rows)
    picked = jnp.take_along_axis(logits, jnp.clip(rel, 0, rows - 1)[..., None], -1)[..., 0]
    tgt_logit = _psum(jnp.where(hit, picked, 0.0), vaxis)
    t = jax.lax.stop_gradient(tgt_logit)[..., None]
    above = (ahead_of_target(jax.lax.stop_gradient(logits), col, t, tgt[..., None])
             & valid & (col != tgt[..., None]))
    if ex is not None:  # a [batch, rows] mask of this shard's excluded rows, by scatter
      b = ex.shape[0]
      rel_ex = jnp.where((ex > 0) & (ex >= start) & (ex < start + rows), ex - start, rows)
      seen = jnp.zeros((b, rows + 1), bool).at[jnp.arange(b)[:, None], rel_ex].set(True)[:, :rows]
      above = above & ~(seen[:, None, :] & (col != tgt[..., None]))
    return lse - tgt_logit, _psum(above.sum(-1), vaxis)

  args = (hidden, table, targets) + (() if exclude is None else (exclude,))
  if axes is None:
    return local(*args)
  specs = (P(baxis, None, None), _table_spec(table, vaxis, baxis), P(baxis, None),
           P(baxis, None))
  return jax.shard_map(local, in_specs=specs[:len(args)],
                       out_specs=(P(baxis, None), P(baxis, None)))(*args)


def top_k(hidden: jax.Array, table: jax.Array, k: int, num_valid: int) -> tuple[jax.Array, jax.Array]:
  """The k best items for each row of hidden [batch, embed]: (scores, ids), both [batch, k].

  Each vocab shard takes its local top-k, the k * shards candidates are gathered, and a
  second top-k merges them, so no device scores more than its own rows.
  """
  axes = _axes()
  vaxis, baxis = axes if axes is not None else (None, None)

  def local(h, tbl):
    tbl = _local_table(tbl)
    start, rows = _shard_bounds(tbl, vaxis)
    scores = jnp.einsum("bd,vd->bv", h, tbl, preferred_element_type=jnp.float32)
    col = start + jnp.arange(rows)
    scores = jnp.where((col > 0) & (col < num_valid), scores, -jnp.inf)
    s, i = jax.lax.top_k(scores, min(k, rows))
    i = i + start
    if vaxis is not None:  # merge: candidates from every shard, in shard (= id) order
      s = jax.lax.all_gather(s, vaxis, axis=1, tiled=True)
      i = jax.lax.all_gather(i, vaxis, axis=1, tiled=True)
    best, pos = jax.lax.top_k(s, k)
    return best, jnp.take_along_axis(i, pos, axis=1)

  if axes is None:
    return local(hidden, table)
  return jax.shard_map(local, in_specs=(P(baxis, None), _table_spec(table, vaxis, baxis)),
                       out_specs=(P(baxis, None), P(baxis, None)), check_vma=False)(hidden, table)
