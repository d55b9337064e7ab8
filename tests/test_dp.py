"""The `dp` step (rec_llm/train/dp_step.py): its modes reduce to the synchronous step, its
compressors train, and bad settings give clear errors.

Tolerance `LAYOUT_RTOL` (tests/helpers.py), data=4 x tensor=2: 'stale' with tau = 0 and the
hierarchical aggregator compute the synchronous losses (only the order of the data-parallel
sum differs); 'local_sgd' with H = 1 (inner SGD, outer SGD with lr 1 and no momentum: the
mean of the replicas' steps) equals synchronous SGD up to the same reordering; with
dp.compression.precondition='adam' and no compression, the step applies the mean of the
replicas' own AdamW directions, which is local SGD with H = 1 and inner AdamW (same tolerance).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from rec_llm.errors import ConfigError
from rec_llm.parallel import control, hlo_stats
from rec_llm.train import config_check, trainer
from tests import numerics
from tests.helpers import LAYOUT_RTOL, step_losses, tiny_config

STEPS = 3


def _config(**dp):
  c = tiny_config(data=4, tensor=2)
  c.train.warmup_steps = 0
  for k, v in dp.items():
    if k in ("optimizer", "grad_clip", "weight_decay"):
      c.train[k] = v
    elif k == "inject_nonfinite_steps":
      c.train.inject_nonfinite.gradients = v
    elif k in ("kind", "ratio", "bits", "rank", "momentum", "precondition"):
      c.dp.compression[k] = v
    else:
      c.dp[k] = v
  return c


def _losses(config, steps=STEPS):
  return step_losses(trainer.build(config), steps)


@pytest.fixture(scope="module")
def sync():
  return {opt: _losses(_config(optimizer=opt, grad_clip=0.0))[0] for opt in ("adamw", "sgd")}


@pytest.mark.parametrize("dp", [dict(mode="stale", staleness=0),
                                dict(aggregator="hierarchical", group=2)],
                         ids=["stale0", "hierarchical"])
def test_reduces_to_sync(sync, dp):
  got, state = _losses(_config(grad_clip=0.0, **dp))
  assert state.dp is not None  # the explicit data-parallel step ran, not GSPMD's
  numerics.check_close("losses", got, sync["adamw"], LAYOUT_RTOL * np.abs(sync["adamw"]))


def test_local_sgd_one_step_is_sync_sgd(sync):
  got, _ = _losses(_config(optimizer="sgd", grad_clip=0.0, mode="local_sgd", local_steps=1,
                           outer_lr=1.0, outer_momentum=0.0))
  numerics.check_close("losses", got, sync["sgd"], LAYOUT_RTOL * np.abs(sync["sgd"]))


def test_local_sgd_outer_step_runs_many_steps():
  # This exact program (its outer all-reduce under a `lax.cond`) segfaulted XLA:CPU's
  # in-process all-reduce in 5 of 5 runs (within 1 to 16 steps where counted); with
  # `control.run_if` it ran 300 steps in each of 3 runs (rec_llm/parallel/control.py).
  c = _config(optimizer="sgd", grad_clip=0.0, mode="local_sgd", local_steps=1, outer_lr=1.0,
              outer_momentum=0.0)
  losses, state = _losses(c, steps=40)
  assert np.isfinite(losses).all() and int(state.skipped) == 0


def test_local_copies_drift_between_syncs(sync):
  local, state = _losses(_config(grad_clip=0.0, mode="local_sgd", local_steps=3), steps=4)
  replicas = jax.device_get(state.dp["local_params"]["item_embedding"])
  assert not np.allclose(replicas[0], replicas[1])  # one local step since the sync at step 3
  numerics.check_close("first loss", local[:1], sync["adamw"][:1],
                       LAYOUT_RTOL * np.abs(sync["adamw"][:1]))
  # ... and later ones differ by far more than reordering could explain.
  assert (np.abs(local[1:STEPS] - sync["adamw"][1:]) > 10 * LAYOUT_RTOL * sync["adamw"][1:]).all()


def test_stale_skips_nonfinite_step_and_keeps_state(sync):
  losses, state = _losses(_config(grad_clip=0.0, mode="stale", staleness=1,
                                  inject_nonfinite_steps=(2,)))
  assert np.isnan(losses[2]) and np.isfinite(losses[[0, 1]]).all()
  # Step 0 only fills the queue, so step 1 still sees the initial parameters.
  assert abs(losses[1] - sync["adamw"][1]) > 10 * LAYOUT_RTOL * sync["adamw"][1]
  assert int(state.skipped) == 1
  leaves = jax.tree.leaves(jax.device_get((state.params, state.dp)))
  assert all(np.isfinite(x).all() for x in leaves)


def test_adam_precondition_is_the_mean_of_local_adamw_steps():
  kw = dict(grad_clip=0.0, weight_decay=0.1)
  got, state = _losses(_config(precondition="adam", **kw), steps=4)
  assert state.dp is not None
  ref, _ = _losses(_config(mode="local_sgd", local_steps=1, outer_lr=1.0, outer_momentum=0.0,
                           **kw), steps=4)
  numerics.check_close("losses", got, ref, LAYOUT_RTOL * np.abs(ref))
  # ... which is not AdamW on the mean gradient (the replicas' moments differ): the test
  # can tell the two apart.
  sync, _ = _losses(_config(**kw), steps=4)
  assert (np.abs(got[1:] - sync[1:]) > 10 * LAYOUT_RTOL * sync[1:]).all(), (got, sync)


@pytest.mark.parametrize("precondition", ["none", "adam"])
def test_topk_with_error_feedback_trains(sync, precondition):
  losses, state = _losses(_config(kind="topk", ratio=0.05, aggregator="sparse",
                                  precondition=precondition), steps=6)
  assert losses[-1] < losses[0] - 0.05, losses
  comp = state.dp["comp"]
  residual = jax.tree.leaves(jax.device_get((comp[-1] if precondition == "adam" else comp).residual))
  assert any(np.abs(r).max() > 0 for r in residual)  # what top-k held back is fed back later


BAD = [
    (dict(kind="topk", ratio=0.0, aggregator="sparse"), "dp.compression.ratio=0.0 must be in (0, 1]"),
    (dict(kind="topk", ratio=1.5, aggregator="sparse"), "dp.compression.ratio=1.5 must be in (0, 1]"),
    (dict(kind="gzip"), "dp.compression.kind='gzip' is unknown"),
    (dict(aggregator="tree"), "dp.aggregator='tree' is unknown"),
    (dict(kind="powersgd", rank=0), "dp.compression.rank=0 must be a positive"),
    (dict(mode="stale", staleness=-1), "dp.staleness=-1 must be >= 0"),
    (dict(mode="local_sgd", local_steps=0), "dp.local_steps=0 must be >= 1"),
    (dict(mode="async"), "dp.mode='async' is unknown"),
    (dict(aggregator="hierarchical", group=3), "dp.group=3 must divide mesh.data=4"),
    (dict(kind="topk", aggregator="ring"), "use dp.aggregator='sparse'"),
    (dict(precondition="lamb"), "dp.compression.precondition='lamb' is unknown"),
    (dict(precondition="adam", optimizer="sgd"), "needs train.optimizer='adamw'"),
    (dict(precondition="adam", mode="local_sgd", local_steps=4), "needs train.optimizer='adamw'"),
]


@pytest.mark.parametrize("dp,needle", BAD, ids=[n for _, n in BAD])
def test_bad_dp_settings(dp, needle):
  with pytest.raises(ConfigError) as e:
    config_check.check(_config(**dp), 8)
  assert needle in str(e.value)


@pytest.mark.parametrize("pred", [True, False])
def test_run_if_runs_at_most_once_and_counts_once(pred):
  """control.run_if's collectives run when pred holds, and hlo_stats counts them once (as
  a conditional's, as if taken), not as a loop of unknown trip count (which it refuses)."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
  f = jax.jit(jax.shard_map(lambda x, p: control.run_if(p, lambda v: jax.lax.psum(v, "data"), x),
                            mesh=mesh, in_specs=(P("data"), P()), out_specs=P("data"),
                            check_vma=False))
  x = jnp.arange(8.0)
  np.testing.assert_array_equal(f(x, pred), np.tile(x[:4] + x[4:], 2) if pred else x)
  text = f.lower(x, pred).compile().as_text()
  sums = [(c.count, c.payload) for c in hlo_stats.collectives(text, {"data": 2})
          if c.kind == "all-reduce"]
  assert sums == [(1, 16)]
