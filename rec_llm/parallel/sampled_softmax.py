"""Sampled-softmax cross-entropy over a vocab-sharded item table, with logQ correction.

Each position's target is scored against `negatives` drawn items: one draw per step shared
by the whole batch, or (`per_row`) one per sequence, shared by its positions. One shared
draw puts the same sampling noise into every position's gradient and trains far worse per
step (README, "Time to quality"); per-row draws cost the same compute. The draw is
stratified: the table's rows are cut into `strata` equal blocks and each block draws
`negatives / strata` of them, with replacement, in proportion to a proposal weight per row:
- 'uniform': every real item alike;
- 'popularity': given counts (e.g. the training data's item frequencies);
- 'in_batch': the rows' counts among this replica's (micro)batch targets, the in-batch
  negatives of retrieval training, drawn instead of enumerated so the cost stays fixed.
A tensor shard holds whole strata (tensor must divide `strata`), so it draws and scores only
its own rows' negatives: no [batch, seq, vocab] block and no gathered negative table ever
exists, and the softmax statistics are combined across shards as in the full softmax. The
draw depends on (seed, step or global row, stratum) only, so the loss is the same on every
mesh (in_batch: on every mesh with the same rows per replica).

logQ: a negative's logit is lowered by log(its expected count in the draw), so that the sum
over the draw estimates the sum over every item (Jean et al. 2015; Yi et al. 2019 for
in-batch). Draws equal to the position's target ("accidental hits") are left out, so the
estimate converges to the full softmax over the items as the draw grows.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from rec_llm.parallel import vocab_parallel as vp

SAMPLERS = ("uniform", "popularity", "in_batch")
SHARES = ("batch", "row")  # train.neg_share: one draw per batch, or one per sequence (per_row)


@dataclasses.dataclass(frozen=True)
class Sampler:
  """How the negatives are drawn. `counts`: [vocab] proposal weights for 'popularity'."""
  kind: str = "uniform"
  negatives: int = 128
  strata: int = 8
  seed: int = 0
  per_row: bool = False  # each batch row its own draw (its positions share it), not one per batch
  counts: np.ndarray | None = dataclasses.field(default=None, compare=False)

  def __post_init__(self):
    if self.kind not in SAMPLERS:
      raise ValueError(f"unknown sampler {self.kind!r}; choose one of {list(SAMPLERS)}")
    if self.negatives < 1 or self.strata < 1 or self.negatives % self.strata:
      raise ValueError(f"{self.strata} strata must divide the {self.negatives} negatives")
    if (self.kind == "popularity") != (self.counts is not None):
      raise ValueError("the popularity sampler needs counts, and only it takes them")


def _weights(s: Sampler, start, rows, valid, tgt):
  """This shard's proposal weight per row [rows], zero on padding rows."""
  if s.kind == "uniform":
    w = jnp.ones((rows,), jnp.float32)
  elif s.kind == "popularity":
    w = jax.lax.dynamic_slice(jnp.asarray(s.counts, jnp.float32), (start,), (rows,))
  else:  # the (micro)batch's own targets, counted on the rows of this shard
    rel = tgt.reshape(-1) - start
    hit = (rel >= 0) & (rel < rows) & (tgt.reshape(-1) != 0)
    w = jnp.zeros((rows,), jnp.float32).at[jnp.where(hit, rel, rows)].add(1.0, mode="drop")
  return jnp.where(valid, w, 0.0)


def draw_seeds(s: Sampler, step, rows: int):
  """[rows] seeds of a step's draws: the step itself on every row (one draw per batch), or
  with `per_row` one per global row."""
  step = jnp.asarray(step, jnp.int32)
  if not s.per_row:
    return jnp.full((rows,), step, jnp.int32)
  return step * rows + jnp.arange(rows, dtype=jnp.int32)


def draw(s: Sampler, key, first_stratum, local_strata: int, w):
  """This shard's draw from its `local_strata` strata (global numbers from first_stratum):
  row offsets in the shard, log(expected count) of each row drawn, and whether the draw is
  real (a stratum without weight draws nothing), all [local_strata * negatives / strata]."""
  k = s.negatives // s.strata
  wg = w.reshape(local_strata, -1)
  cdf = jnp.cumsum(wg, -1)
  total = cdf[:, -1:]
  keys = jax.vmap(lambda g: jax.random.fold_in(key, g))(first_stratum + jnp.arange(local_strata))
  u = jax.vmap(lambda kk: jax.random.uniform(kk, (k,)))(keys) * total
  # Inverse CDF: the first row whose cumulative weight exceeds u (zero-weight rows never).
  idx = jnp.minimum(jax.vmap(lambda c, x: jnp.searchsorted(c, x, side="right"))(cdf, u),
                    wg.shape[1] - 1)
  wsel = jnp.take_along_axis(wg, idx, -1)
  ok = wsel > 0
  logq = jnp.where(ok, jnp.log(k * jnp.where(ok, wsel, 1.0) / jnp.maximum(total, 1e-30)), 0.0)
  rows = idx + wg.shape[1] * jnp.arange(local_strata)[:, None]
  return rows.reshape(-1), logq.reshape(-1), ok.reshape(-1)


def sampled_xent(hidden: jax.Array, table: jax.Array, targets: jax.Array, seeds: jax.Array,
                 num_valid: int, sampler: Sampler) -> tuple[jax.Array, jax.Array]:
  """Sampled-softmax cross-entropy, vocab-parallel, as `vocab_parallel.softmax_xent` takes
  its arguments.

  Args:
    hidden: [batch, seq, embed]; table: [vocab, embed] (rows over 'vocab') or `tie`'s copies.
    targets: [batch, seq] item ids (0: padding).
    seeds: [batch] the draw's seed on every row (`draw_seeds`; rows carry it so that
      microbatches and data shards see it like the rest of the batch).
    num_valid: ids 1..num_valid-1 are real items.
    sampler: the draw.

  Returns:
    (nll, rank), both [batch, seq]: the corrected sampled-softmax loss of each target and
    how many drawn negatives (accidental hits excluded) score ahead of it (uncorrected), so
    rank < 10 is a hit among the sample, not among every item.
  """
  axes = vp._axes()
  vaxis, baxis = axes if axes is not None else (None, None)
  shards = 1 if vaxis is None else jax.sharding.get_abstract_mesh().shape[vaxis]
  if sampler.strata % shards:
    raise ValueError(f"{shards} vocab shards must divide sampler.strata={sampler.strata}")
  local_strata = sampler.strata // shards

  def local(h, tbl, tgt, sds):
    tbl = vp._local_table(tbl)
    start, rows = vp._shard_bounds(tbl, vaxis)
    col = start + jnp.arange(rows)
    w = _weights(sampler, start, rows, (col > 0) & (col < num_valid), tgt)
    first = 0 if vaxis is None else jax.lax.axis_index(vaxis) * local_strata
    one = lambda sd: draw(sampler, jax.random.fold_in(jax.random.PRNGKey(sampler.seed), sd),
                          first, local_strata, w)
    if sampler.per_row:  # [rows, 1, n]: each row's own negatives
      off, logq, ok = (x[:, None] for x in jax.vmap(one)(sds))
      neg = jnp.einsum("bsd,bnd->bsn", h, jnp.take(tbl, off[:, 0], axis=0),
                       preferred_element_type=jnp.float32)
    else:
      off, logq, ok = one(sds[0])
      neg = jnp.einsum("bsd,nd->bsn", h, jnp.take(tbl, off, axis=0),
                       preferred_element_type=jnp.float32)
    keep = ok & ((start + off) != tgt[..., None])  # accidental hits left out
    logits = jnp.where(keep, neg - logq, vp._NEG)
    rel = tgt - start
    hit = (rel >= 0) & (rel < rows)
    own = jnp.einsum("bsd,bsd->bs", h, jnp.take(tbl, jnp.clip(rel, 0, rows - 1), axis=0),
                     preferred_element_type=jnp.float32)
    tgt_logit = vp._psum(jnp.where(hit, own, 0.0), vaxis)
    m = jax.lax.stop_gradient(jnp.maximum(logits.max(-1), tgt_logit))
    if vaxis is not None:
      m = jax.lax.pmax(m, vaxis)
    sumexp = vp._psum(jnp.exp(logits - m[..., None]).sum(-1), vaxis) + jnp.exp(tgt_logit - m)
    t = jax.lax.stop_gradient(tgt_logit)[..., None]
    ahead = keep & vp.ahead_of_target(jax.lax.stop_gradient(neg), start + off, t, tgt[..., None])
    return jnp.log(sumexp) + m - tgt_logit, vp._psum(ahead.sum(-1), vaxis)

  args = (hidden, table, targets, seeds)
  if axes is None:
    return local(*args)
  specs = (P(baxis, None, None), vp._table_spec(table, vaxis, baxis), P(baxis, None), P(baxis))
  return jax.shard_map(local, in_specs=specs, out_specs=(P(baxis, None), P(baxis, None)))(*args)
