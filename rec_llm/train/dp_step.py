"""The data-parallel step of the `dp` config: compressed gradients, stale and local-SGD modes.

The default step (step.make_train_step) leaves the gradient all-reduce to GSPMD. This one
makes the data-parallel reduction explicit, with two shard_maps:
1. manual over 'data' ('tensor' stays GSPMD): each replica's gradient of its own rows, scaled
   so the replica mean is the mean over all targets, as in the synchronous step;
2. manual over every axis: each device compresses its shard of its replica's gradient, and
   the replicas of each data-parallel group combine them with the chosen aggregator
   (rec_llm.parallel.compression). The compressor's per-device state (error feedback,
   PowerSGD's Q, ...) rides in `TrainState.dp`, stacked over all devices.

Modes (`dp.mode`):
- 'sync': reduce this step's gradients.
- 'stale' (tau = dp.staleness): the state queues tau local gradients and the step reduces the
  oldest, so the update at step t uses the gradients of step t - tau and the reduction does
  not wait on this step's backward (XLA may run the two at once). The first tau steps only
  fill the queue. tau = 0 is 'sync'.
- 'local_sgd' (H = dp.local_steps, DiLoCo): each replica trains its own copy with the inner
  optimizer (train.optimizer); every H steps the mean of (global - local) is the outer
  gradient of a Nesterov SGD step (dp.outer_lr, dp.outer_momentum) and every copy restarts
  from the new global parameters. Communication happens once per H steps.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from rec_llm.numerics import all_finite
from rec_llm.parallel import compression, control, sharding
from rec_llm.train import guard, optimizer
from rec_llm.train.faults import Faults
from rec_llm.train.step import TrainState, loss_fn, with_step

DATA = "data"


def uses_dp_step(config: ConfigDict) -> bool:
  """True when the `dp` section asks for more than GSPMD's synchronous all-reduce."""
  dp = config.dp
  return (dp.mode != "sync" or dp.compression.kind != "none" or dp.aggregator != "psum"
          or local_moments(config))


def local_moments(config: ConfigDict) -> bool:
  """dp.compression.precondition='adam': each replica keeps AdamW's moments of its own
  gradients and the compressor sends its Adam direction; the optimizer after the mean
  applies only weight decay and the learning rate (optimizer.make(moments=False)); the
  logged grad_norm is then the norm of the mean direction."""
  return config.dp.compression.precondition == "adam"


def make_compressor(config: ConfigDict, replicas: int) -> optax.GradientTransformation:
  dp, c = config.dp, config.dp.compression
  comp = compression.make(c.kind, axis=DATA, replicas=replicas, aggregator=dp.aggregator,
                          ratio=float(c.ratio), bits=int(c.bits), rank=int(c.rank),
                          group=int(dp.group), momentum=float(c.momentum),
                          seed=int(config.train.seed))
  # Adam's direction is what the step applies, so it is what error feedback must keep whole
  # and what top-k should rank (raw gradients rank by scale, which Adam divides out).
  return optax.chain(optimizer.adam_moments(config.train), comp) if local_moments(config) \
      else comp


def outer_optimizer(dp: ConfigDict) -> optax.GradientTransformation:
  """DiLoCo's outer step: SGD with Nesterov momentum on the averaged (global - local) delta."""
  momentum = float(dp.outer_momentum)
  return optax.sgd(float(dp.outer_lr), momentum=momentum or None,
                   nesterov=momentum > 0)


def _per_replica(s: NamedSharding) -> NamedSharding:
  """A copy per data replica, stacked on a new leading axis split over 'data'."""
  return NamedSharding(s.mesh, P(DATA, *s.spec))


def _per_device(mesh: Mesh) -> NamedSharding:
  """A value per device, stacked on a leading axis split over every mesh axis."""
  return NamedSharding(mesh, P(tuple(mesh.axis_names)))


class DPStep:
  """Builds the `dp` state and the (state, batch) -> (state, metrics) step for one mesh."""

  def __init__(self, model: nn.Module, tx: optax.GradientTransformation, head,
               mesh: Mesh, param_shardings: Any, opt_shardings: Any, config: ConfigDict,
               faults: Faults | None = None):
    self.model, self.tx, self.head, self.mesh = model, tx, head, mesh
    self.param_shardings, self.opt_shardings = param_shardings, opt_shardings
    dp = config.dp
    self.mode = dp.mode
    self.tau = int(dp.staleness) if self.mode == "stale" else 0
    self.local_steps = int(dp.local_steps)
    self.replicas = mesh.shape[DATA]
    self.seed = int(config.train.seed)
    self.dropout = config.model.dropout_rate > 0
    self.comp = make_compressor(config, self.replicas)
    self.faults = faults
    self.outer_tx = outer_optimizer(dp) if self.mode == "local_sgd" else None

  # --- state ------------------------------------------------------------------------------

  def state_shardings(self) -> dict:
    rep = lambda t: jax.tree.map(_per_replica, t)
    out = {"comp": _per_device(self.mesh)}
    if self.mode == "stale":
      out["queue"] = tuple(rep(self.param_shardings) for _ in range(self.tau))
    if self.mode == "local_sgd":
      out["local_params"] = rep(self.param_shardings)
      out["local_opt"] = rep(self.opt_shardings)
    return out

  def init(self, params) -> dict:
    """The `dp` state for (unboxed, sharded) params; call under jit with state_shardings()."""
    specs = jax.tree.map(lambda s: s.spec, self.param_shardings)
    comp = jax.shard_map(lambda p: jax.tree.map(lambda x: x[None], self.comp.init(p)),
                         mesh=self.mesh, in_specs=(specs,),
                         out_specs=P(tuple(self.mesh.axis_names)), check_vma=False)(params)
    stack = lambda t: jax.tree.map(
        lambda x: jnp.broadcast_to(x[None], (self.replicas, *x.shape)), t)
    out = {"comp": comp}
    if self.mode == "stale":
      out["queue"] = tuple(jax.tree.map(jnp.zeros_like, stack(params)) for _ in range(self.tau))
    if self.mode == "local_sgd":
      out["local_params"] = stack(params)
      out["local_opt"] = stack(self.tx.init(params))
    return out

  # --- the two shard_maps -----------------------------------------------------------------

  def _local_grads(self, params, batch, rng, stacked: bool):
    """Per-replica gradients [replicas, ...], scaled so their mean is the global gradient;
    the global loss and hit rate."""
    n, model, head = self.replicas, self.model, self.head

    def body(params, batch, rng):
      if stacked:
        params = jax.tree.map(lambda x: x[0], params)
      rng = jax.random.fold_in(rng, lax.axis_index(DATA)) if self.dropout else None
      with sharding.manual((DATA,)):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(
            params, batch, model, head, rng)
      count = aux["targets"].astype(jnp.float32)
      total = jnp.maximum(lax.psum(count, DATA), 1.0)
      w = count / total
      g = jax.tree.map(lambda x: (x * (w * n))[None], g)
      metrics = {"loss": lax.psum(loss * w, DATA), "hr@10": lax.psum(aux["hr@10"] * w, DATA),
                 "targets": lax.psum(aux["targets"], DATA)}
      return g, metrics

    return jax.shard_map(body, mesh=self.mesh,
                         in_specs=(P(DATA) if stacked else P(), P(DATA), P()),
                         out_specs=(P(DATA), P()), axis_names={DATA}, check_vma=False)(
                             params, batch, rng)

  def _reduce(self, stacked_grads, comp_state):
    """The replica mean of compressed per-replica gradients, with the compressor's state."""
    mesh, comp = self.mesh, self.comp
    specs = jax.tree.map(lambda s: s.spec, self.param_shardings)
    rep_specs = jax.tree.map(lambda s: P(DATA, *s.spec), self.param_shardings)
    stacked_grads = jax.lax.with_sharding_constraint(
        stacked_grads, jax.tree.map(_per_replica, self.param_shardings))
    every = P(tuple(mesh.axis_names))

    def body(g, cs):
      first = lambda t: jax.tree.map(lambda x: x[0], t)
      mean, cs = comp.update(first(g), first(cs), None)
      return mean, jax.tree.map(lambda x: x[None], cs)

    return jax.shard_map(body, mesh=mesh, in_specs=(rep_specs, every),
                         out_specs=(specs, every), check_vma=False)(stacked_grads, comp_state)

  # --- the step ---------------------------------------------------------------------------

  def _grads_and_tx(self, state, params, batch, stacked: bool):
    """(loss, per-replica gradients, metrics, the step's optimizer): with fault injection
    (tests), the faults of this step applied."""
    base = jax.random.fold_in(jax.random.PRNGKey(self.seed), state.step)
    g_local, m = self._local_grads(params, with_step(batch, state.step, self.head), base,
                                   stacked=stacked)
    loss, tx = m["loss"], self.tx
    if self.faults is not None:
      loss, g_local = self.faults.gradients_at(state.step, loss, g_local)
      tx = self.faults.optimizer(tx, state.step)
    return loss, g_local, m, tx

  def __call__(self, state: TrainState, batch):
    if self.mode == "local_sgd":
      return self._local_sgd(state, batch)
    dp = state.dp
    loss, g_local, m, tx = self._grads_and_tx(state, state.params, batch, stacked=False)
    # This step's gradients, checked once: older queued ones passed when they were pushed, and
    # a compressor may leave a non-finite entry unsent (in its residual) rather than reduce it.
    ok = jnp.isfinite(loss) & all_finite(g_local)
    new_dp = dict(dp)
    if self.tau:
      queue = dp["queue"] + (g_local,)
      g_local, new_dp["queue"] = queue[0], queue[1:]
    grads, new_dp["comp"] = self._reduce(g_local, dp["comp"])
    grad_norm = optax.tree.norm(grads)
    ok = ok & jnp.isfinite(grad_norm) & all_finite(new_dp["comp"])
    warm = state.step >= self.tau  # 'stale': the first tau steps only fill the queue
    params, opt_state, applied = guard.update(tx, grads, state.opt_state, state.params,
                                              ok & warm)
    ok = ok & (applied | ~warm)  # an update that came out non-finite skips the step
    new_state = state.replace(
        step=state.step + 1, params=params, opt_state=opt_state,
        dp=guard.keep_if(ok, new_dp, dp), skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": new_state.skipped,
               "hr@10": m["hr@10"], "targets": m["targets"]}
    return new_state, metrics

  def _local_sgd(self, state, batch):
    dp = state.dp
    loss, g_local, m, tx = self._grads_and_tx(state, dp["local_params"], batch, stacked=True)
    local, local_opt, finite = jax.vmap(functools.partial(guard.apply, tx))(
        g_local, dp["local_opt"], dp["local_params"])
    # Every replica's step must be finite, or none takes effect (the copies stay in step).
    ok = jnp.isfinite(loss) & all_finite(g_local) & finite.all()

    def outer(args):
      local, comp_state, params, opt_state = args
      delta = jax.tree.map(lambda p, l: p[None] - l, params, local)
      mean_delta, comp_state = self._reduce(delta, comp_state)
      upd, opt_state = self.outer_tx.update(mean_delta, opt_state, params)
      params = optax.apply_updates(params, upd)
      local = jax.tree.map(lambda p, l: jnp.broadcast_to(p[None], l.shape), params, local)
      return local, comp_state, params, opt_state

    sync = (state.step + 1) % self.local_steps == 0
    local, comp, params, opt_state = control.run_if(
        sync, outer, (local, dp["comp"], state.params, state.opt_state))
    new_dp = {**dp, "local_params": local, "local_opt": local_opt, "comp": comp}
    ok = ok & all_finite(params, opt_state, comp)  # the outer step's results
    new_state = state.replace(
        step=state.step + 1, params=guard.keep_if(ok, params, state.params),
        opt_state=guard.keep_if(ok, opt_state, state.opt_state),
        dp=guard.keep_if(ok, new_dp, dp), skipped=state.skipped + (~ok).astype(jnp.int32))
    grad_norm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(g_local))
                         / self.replicas)  # the replicas' RMS gradient norm
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "skipped": new_state.skipped, "hr@10": m["hr@10"], "targets": m["targets"]}
    return new_state, metrics
