"""Fault injection for tests: non-finite values at chosen steps (`train.inject_nonfinite`).

    train.inject_nonfinite = {"gradients": (6,), "updates": (), "opt_state": ()}

At a listed step (the 0-based `state.step` the step starts from, so 6 is the 7th logged
step) the step's loss and gradients, its parameter update, or its new optimizer state are
made NaN, which is what overflow, a bad batch or a bad learning rate do. With nothing
listed, `from_config` returns None and no step contains any of this.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax
from ml_collections import ConfigDict

KINDS = ("gradients", "updates", "opt_state")


def _poison(tree, hit):
  return jax.tree.map(lambda x: jnp.where(hit, jnp.nan, x) if jnp.issubdtype(
      jnp.result_type(x), jnp.inexact) else x, tree)


@dataclasses.dataclass(frozen=True)
class Faults:
  gradients: tuple[int, ...] = ()
  updates: tuple[int, ...] = ()
  opt_state: tuple[int, ...] = ()

  def _at(self, kind: str, step: jax.Array) -> jax.Array:
    steps = getattr(self, kind)
    return jnp.isin(step, jnp.asarray(steps or (-1,), jnp.int32))

  def gradients_at(self, step, loss, grads):
    """(loss, grads), NaN at the listed steps."""
    hit = self._at("gradients", step)
    return _poison(loss, hit), _poison(grads, hit)

  def optimizer(self, tx: optax.GradientTransformation, step) -> optax.GradientTransformation:
    """`tx` whose updates / new state are NaN at the listed steps (`step` is traced)."""
    def update(grads, state, params=None):
      updates, state = tx.update(grads, state, params)
      return (_poison(updates, self._at("updates", step)),
              _poison(state, self._at("opt_state", step)))
    return optax.GradientTransformation(tx.init, update)


def from_config(train_cfg: ConfigDict) -> Faults | None:
  spec = train_cfg.inject_nonfinite
  faults = Faults(**{k: tuple(int(s) for s in spec[k]) for k in KINDS})
  return faults if any(getattr(faults, k) for k in KINDS) else None
