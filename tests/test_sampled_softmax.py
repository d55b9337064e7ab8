"""Sampled softmax (rec_llm/parallel/sampled_softmax.py): the same draw and the same loss
and gradients on every layout as on one device, an estimate that tends to the full
softmax, draws in proportion to the proposal, and training through every step kind.

Tolerance: `LAYOUT_RTOL` (tests/helpers.py), as for the full softmax: layouts only reorder
float32 sums, and the draw is a function of (seed, step, stratum) alone.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rec_llm.errors import ConfigError
from rec_llm.parallel import mesh as mesh_lib
from rec_llm.parallel import sampled_softmax as ss
from rec_llm.parallel import sharding, vocab_parallel as vp
from rec_llm.train import trainer
from tests import numerics
from tests.helpers import LAYOUT_RTOL, step_losses, tiny_config

V, D, B, S, VALID = 256, 16, 8, 6, 200


def _inputs(scale=0.5):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
  hidden = jax.random.normal(k1, (B, S, D)) * scale
  table = jax.random.normal(k2, (V, D)) * scale
  targets = jax.random.randint(k3, (B, S), 0, VALID)  # some 0s: padding
  return hidden, table, targets, jnp.full((B,), 7, jnp.int32)


def _sampler(kind, negatives=64, per_row=False):
  counts = np.where(np.arange(V) < VALID, 1.0 + np.arange(V) % 17, 0).astype(np.float32)
  return ss.Sampler(kind, negatives, 8, 0, per_row,
                    counts=counts if kind == "popularity" else None)


def _loss_and_grads(sampler, hidden, table, targets, step, mesh=None):
  def f(h, t):
    nll, rank = ss.sampled_xent(h, vp.tie(t) if mesh else t, targets, step, VALID, sampler)
    return jnp.where(targets != 0, nll, 0.0).sum(), (nll, rank)
  fn = jax.jit(jax.value_and_grad(f, (0, 1), has_aux=True))
  if mesh is None:
    return jax.device_get(fn(hidden, table))
  with sharding.activate(mesh):
    return jax.device_get(fn(hidden, table))


@pytest.mark.parametrize("kind,per_row", [(k, False) for k in ss.SAMPLERS] + [("uniform", True)])
def test_every_layout_draws_and_scores_as_one_device(kind, per_row):
  """uniform and popularity, one draw per batch or per row: the same on (data, tensor) =
  (4, 2) and (1, 8). in_batch draws from each replica's own targets, so its reference is
  one device run on each replica's rows in turn."""
  hidden, table, targets, _ = _inputs()
  sampler = _sampler(kind, per_row=per_row)
  step = ss.draw_seeds(sampler, 7, B)
  for data, tensor in [(4, 2), (1, 8)]:
    mesh = mesh_lib.build_mesh(dict(data=data, tensor=tensor, pipe=1), jax.devices())
    (loss, (nll, rank)), grads = _loss_and_grads(sampler, hidden, table, targets, step, mesh)
    rows = B // data if kind == "in_batch" else B
    parts = [_loss_and_grads(sampler, hidden[i:i + rows], table, targets[i:i + rows],
                             step[i:i + rows]) for i in range(0, B, rows)]
    ref_nll = np.concatenate([p[0][1][0] for p in parts])
    ref_rank = np.concatenate([p[0][1][1] for p in parts])
    ref_gh = np.concatenate([p[1][0] for p in parts])
    ref_gt = sum(p[1][1] for p in parts)
    what = f"{kind} per_row={per_row} {data}x{tensor}"
    numerics.check_close(f"{what} nll", nll, ref_nll, LAYOUT_RTOL * np.abs(ref_nll) + 1e-6)
    np.testing.assert_array_equal(rank, ref_rank)
    numerics.check_tree_rel(f"{what} gradient", {"h": grads[0], "t": grads[1]},
                            {"h": ref_gh, "t": ref_gt}, LAYOUT_RTOL)
  assert np.isfinite(loss) and (rank[targets != 0] <= sampler.negatives).all()


def test_estimate_tends_to_the_full_softmax():
  """With logQ and accidental hits left out, the loss averaged over draws approaches the
  full softmax's as the draw grows: far off at 8 negatives, within 0.5% at 32x the vocab."""
  hidden, table, targets, _ = _inputs(scale=1.5)  # peaked scores: a small draw misses mass
  full = float(np.mean(vp.softmax_xent(hidden, table, targets, VALID)[0]))
  est = jax.jit(lambda stp, s: ss.sampled_xent(hidden, table, targets, stp, VALID, s)[0].mean(),
                static_argnums=1)

  def mean_loss(n):
    return float(np.mean([est(jnp.full((B,), i, jnp.int32), ss.Sampler("uniform", n, 8))
                          for i in range(6)]))
  small, large = mean_loss(8), mean_loss(32 * V)
  assert abs(large - full) < 0.005 * full, (large, full)
  assert abs(small - full) > 4 * abs(large - full), (small, large, full)


def test_popularity_draws_in_proportion_to_counts():
  """Over many steps each row is drawn in proportion to its count within its stratum (and
  the logQ of a draw is log(its expected count)); padding rows are never drawn, and a
  stratum of padding only (rows 224-255 here) draws nothing."""
  s = _sampler("popularity", negatives=512)
  w = jnp.asarray(s.counts)
  draws = jax.jit(jax.vmap(lambda i: ss.draw(s, jax.random.PRNGKey(i), 0, s.strata, w)))
  rows, logq, ok = jax.device_get(draws(jnp.arange(200)))
  per = V // s.strata
  assert (ok == (np.arange(s.negatives) < s.negatives - 64)).all()
  rows = rows[:, ok[0]]
  assert (rows < VALID).all() and (s.counts[rows] > 0).all()
  freq = np.bincount(rows.reshape(-1), minlength=V) / rows.shape[0]
  expect = np.zeros(V)
  for g in range(s.strata):
    blk = s.counts[g * per:(g + 1) * per]
    if blk.sum():
      expect[g * per:(g + 1) * per] = s.negatives / s.strata * blk / blk.sum()
  drawn = expect > 0
  assert np.abs(freq[drawn] - expect[drawn]).max() < 0.15 * expect[drawn].max()
  np.testing.assert_allclose(np.exp(logq[0][ok[0]]), expect[rows[0]], rtol=1e-5)


def _sampled_config(**mesh):
  c = tiny_config(**mesh)
  c.train.update(loss="sampled", negatives=32, neg_strata=4, sampler="uniform", neg_share="row")
  return c


def test_training_matches_one_device_on_every_step_kind():
  """Three optimizer steps with 32 uniform negatives per row: the pipeline (1F1B, 2 microbatches,
  stage-local stages) on 2x2x2 and the explicit data-parallel step (ring aggregation) on
  4x2x1 equal one device's losses. (The GSPMD step is loss_fn under jit: the loss itself
  is checked on its layouts above.)"""
  ref, _ = step_losses(trainer.build(_sampled_config(), jax.devices()[:1]), 3)
  pipe = _sampled_config(data=2, tensor=2, pipe=2)
  pipe.pipeline.update(schedule="1f1b", microbatches=2, stage_layers=(1, 1))
  dp = _sampled_config(data=4, tensor=2)
  dp.dp.aggregator = "ring"
  for name, cfg in [("pipeline", pipe), ("dp", dp)]:
    got, _ = step_losses(trainer.build(cfg, jax.devices()), 3)
    numerics.check_close(f"{name} losses", got, ref, LAYOUT_RTOL * np.abs(ref))


@pytest.mark.parametrize("change,needle", [
    (dict(loss="sampeld"), "train.loss='sampeld' is unknown"),
    (dict(sampler="zipf"), "train.sampler='zipf' is unknown"),
    (dict(negatives=30), "train.neg_strata=4 must divide train.negatives=30"),
    (dict(neg_strata=1), "train.neg_strata=1 is not divisible by mesh.tensor=2"),
    (dict(neg_share="position"), "train.neg_share='position' is unknown"),
])
def test_bad_sampled_config(change, needle):
  c = _sampled_config(data=4, tensor=2)
  c.train.update(change)
  with pytest.raises(ConfigError, match=needle):
    trainer.build(c, jax.devices(), init=False)
