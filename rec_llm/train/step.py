"""The train state, the loss and the jitted synchronous data+tensor parallel step."""

from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from rec_llm.parallel import vocab_parallel


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  skipped: jax.Array  # steps whose loss or gradient was not finite (their update was dropped)


def init_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int, rng: jax.Array):
  """A boxed (logically annotated) train state; unbox before use."""
  params = model.init(rng, jnp.ones((1, seq_len), jnp.int32))["params"]
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero)


def loss_fn(params, batch, model: nn.Module, num_valid: int, dropout_rng=None):
  """Mean next-item cross-entropy over non-padding targets, plus train hit rate."""
  train = dropout_rng is not None
  hidden, table = model.apply({"params": params}, batch["inputs"], train=train,
                              rngs={"dropout": dropout_rng} if train else None)
  nll, rank = vocab_parallel.softmax_xent(hidden, table, batch["targets"], num_valid)
  mask = batch["targets"] != 0
  count = jnp.maximum(mask.sum(), 1)
  loss = jnp.where(mask, nll, 0.0).sum() / count
  return loss, {"hr@10": ((rank < 10) & mask).sum() / count, "targets": mask.sum()}


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, num_valid: int,
                    seed: int, dropout: bool, inject_nonfinite_steps: Sequence[int] = ()):
  """(state, batch) -> (state, metrics). A step whose loss or gradient is not finite leaves
  params and optimizer state untouched and counts in `state.skipped`, so a non-finite value
  can never reach a checkpoint. `inject_nonfinite_steps` is fault injection for tests."""
  base_rng = jax.random.PRNGKey(seed)
  inject = jnp.asarray(list(inject_nonfinite_steps) or [-1], jnp.int32)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step) if dropout else None
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, model, num_valid, rng)
    poison = jnp.where(jnp.isin(state.step, inject), jnp.nan, 1.0)
    loss, grads = loss * poison, jax.tree.map(lambda g: g * poison, grads)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
    new_state = TrainState(step=state.step + 1, params=keep(params, state.params),
                           opt_state=keep(opt_state, state.opt_state),
                           skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": new_state.skipped, **aux}
    return new_state, metrics

  return train_step
