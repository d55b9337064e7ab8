"""The one guarded optimizer update that every step variant uses.

A step takes effect only if everything it produced is finite: its loss and gradients (the
caller's `ok`), and the new parameters and optimizer state, which an update can overflow
where the gradient did not (a huge learning rate, an exploding Adam moment). Otherwise the
state stays as it was and the step counts in `TrainState.skipped`, so a non-finite value
can never reach a checkpoint or a metric.
"""

import jax
import jax.numpy as jnp
import optax

from rec_llm.numerics import all_finite


def keep_if(ok: jax.Array, new, old):
  """`new` where `ok`, else `old` (trees of the same structure)."""
  return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def apply(tx: optax.GradientTransformation, grads, opt_state, params):
  """(new params, new optimizer state, whether both are finite): one step, unguarded."""
  updates, new_opt = tx.update(grads, opt_state, params)
  new_params = optax.apply_updates(params, updates)
  return new_params, new_opt, all_finite(new_params, new_opt)


def update(tx: optax.GradientTransformation, grads, opt_state, params, ok: jax.Array):
  """(params, opt_state, ok): the step's new state if `ok` and the result is finite, else
  the old one; the returned `ok` says which."""
  new_params, new_opt, finite = apply(tx, grads, opt_state, params)
  ok = ok & finite
  return keep_if(ok, new_params, params), keep_if(ok, new_opt, opt_state), ok
