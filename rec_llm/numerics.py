"""Finite checks of pytrees: inside a step (traced) and on the host (for messages).

A non-finite value must never become a metric or a checkpoint; these are the two checks
every path uses (the guarded update, restore, the evaluator).
"""

import jax
import jax.numpy as jnp
import numpy as np


def all_finite(*trees) -> jax.Array:
  """Traced bool scalar: every floating-point leaf of every tree is finite."""
  leaves = [x for t in trees for x in jax.tree.leaves(t)
            if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.asarray(True)
  return jnp.stack([jnp.isfinite(x).all() for x in leaves]).all()


@jax.jit
def _nonfinite_counts(tree):
  return jax.tree.map(lambda x: jnp.sum(~jnp.isfinite(x)) if jnp.issubdtype(
      jnp.result_type(x), jnp.inexact) else jnp.zeros((), jnp.int32), tree)


def nonfinite_leaves(tree) -> list[str]:
  """'path (n values)' for every leaf of `tree` holding NaN or infinite values (arrays may
  span processes: each process reads its own copy of the replicated counts)."""
  counts = jax.tree_util.tree_flatten_with_path(_nonfinite_counts(tree))[0]
  out = []
  for path, n in counts:
    n = int(np.asarray(n.addressable_data(0)) if isinstance(n, jax.Array) else n)
    if n:
      out.append(f"{jax.tree_util.keystr(path)} ({n} values)")
  return out
