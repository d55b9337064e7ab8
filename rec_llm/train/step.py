"""The train state, the loss and the jitted synchronous data+tensor parallel step."""

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jax.sharding import Mesh

from rec_llm.models import seq_transformer
from rec_llm.models.seq_transformer import ModelConfig
from rec_llm.parallel import pipeline, sampled_softmax, schedules, sharding, vocab_parallel
from rec_llm.train import guard
from rec_llm.train.faults import Faults


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  skipped: jax.Array  # steps whose loss or gradient was not finite (their update was dropped)
  dp: Any = None  # the `dp` step's state (rec_llm/train/dp_step.py); None for the default step


def init_state(model: nn.Module, tx: optax.GradientTransformation, seq_len: int, rng: jax.Array):
  """A boxed (logically annotated) train state; unbox before use."""
  params = model.init(rng, jnp.ones((1, seq_len), jnp.int32))["params"]
  zero = jnp.zeros((), jnp.int32)
  return TrainState(step=zero, params=params, opt_state=tx.init(params), skipped=zero)


@dataclasses.dataclass(frozen=True)
class Head:
  """The training loss: a full softmax over the items 1..num_valid-1, or with a `sampler`
  a sampled softmax (rec_llm/parallel/sampled_softmax.py). Functions taking a head also
  take a plain num_valid, meaning the full softmax."""
  num_valid: int
  sampler: sampled_softmax.Sampler | None = None


def as_head(head) -> Head:
  return head if isinstance(head, Head) else Head(int(head))


def with_step(batch: dict, step: jax.Array, head) -> dict:
  """The batch with its draw seeds ("draw_seed", from the step) on every row when the head
  draws negatives: rows travel to every data shard and microbatch, so each sees the same
  draw."""
  sampler = as_head(head).sampler
  if sampler is None:
    return batch
  seeds = sampled_softmax.draw_seeds(sampler, step, batch["targets"].shape[0])
  return {**batch, "draw_seed": seeds}


def loss_fn(params, batch, model: nn.Module, head, dropout_rng=None):
  """Mean next-item cross-entropy over non-padding targets, plus train hit rate."""
  train = dropout_rng is not None
  hidden, table = model.apply({"params": params}, batch["inputs"], train=train,
                              rngs={"dropout": dropout_rng} if train else None)
  nll_sum, hits, targets = head_sums(hidden, table, batch, head)
  count = jnp.maximum(targets, 1)
  return nll_sum / count, {"hr@10": hits / count, "targets": targets}


def head_sums(hidden, table, batch, head):
  """Sums over the non-padding targets: (negative log-likelihood, hits@10, count). Under a
  sampled head, hits count among the drawn negatives."""
  head, targets = as_head(head), batch["targets"]
  mask = targets != 0
  if head.sampler is None:  # (the sum's gradient is computed with its value)
    nll_sum, rank = vocab_parallel.softmax_xent(hidden, table, targets, head.num_valid, total=True)
  else:
    nll, rank = sampled_softmax.sampled_xent(hidden, table, targets, batch["draw_seed"],
                                             head.num_valid, head.sampler)
    nll_sum = jnp.where(mask, nll, 0.0).sum()
  return nll_sum, ((rank < 10) & mask).sum(), mask.sum()


def stage_fns(cfg: ModelConfig, head) -> pipeline.StageFns:
  """The model and this loss cut into pipeline stages: embedding, one block, norm + loss."""

  def last(shared, x, mb):
    hidden, table = seq_transformer.final_norm(cfg, shared, x)
    nll_sum, hits, targets = head_sums(hidden, table, mb, head)
    return nll_sum, {"hits": hits.astype(jnp.float32), "targets": targets.astype(jnp.float32)}

  return pipeline.StageFns(
      first=lambda shared, mb: seq_transformer.embed(cfg, shared, mb["inputs"]),
      layer=lambda p, x, mb: seq_transformer.block(cfg, p, x, mb["inputs"]),
      last=last)


def make_pipelined_value_and_grad(model_cfg: ModelConfig, head, mesh: Mesh,
                                  pipe_cfg: dict, param_shardings=None, stage_local=False):
  """`jax.value_and_grad(loss_fn, has_aux=True)` for mesh.pipe > 1, run as a pipeline.

  The blocks (params['blocks'], stacked [L, ...]) are split over the stages; the embedding
  runs on the first stage and the final norm + vocab-parallel loss on the last.
  """
  cfg = model_cfg
  fns = stage_fns(cfg, head)
  sizes = schedules.stage_sizes(cfg.num_layers, mesh.shape[sharding.mesh_axis("stage")],
                               tuple(pipe_cfg["stage_layers"]))

  def value_and_grad(params, batch, model, head_, dropout_rng=None):
    del model, head_
    if dropout_rng is not None:
      raise ValueError("the pipeline does not support dropout")  # config_check rejects it first
    shared = {k: v for k, v in params.items() if k != "blocks"}
    targets = (batch["targets"] != 0).sum()
    scale = 1.0 / jnp.maximum(targets, 1).astype(jnp.float32)
    (loss, aux), (g_blocks, g_shared) = pipeline.value_and_grad(
        fns, params["blocks"], shared, batch, scale, mesh=mesh,
        schedule=pipe_cfg["schedule"], microbatches=int(pipe_cfg["microbatches"]),
        stage_layers=sizes, remat=bool(pipe_cfg["remat"]), stage_local=stage_local,
        layer_shardings=None if param_shardings is None else param_shardings["blocks"])
    count = jnp.maximum(targets, 1)
    grads = {**g_shared, "blocks": g_blocks}
    return (loss, {"hr@10": aux["hits"] / count, "targets": targets}), grads

  return value_and_grad


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, head,
                    seed: int, dropout: bool, faults: Faults | None = None,
                    value_and_grad=None, grad_shardings=None):
  """(state, batch) -> (state, metrics), for GSPMD data + tensor parallelism and for the
  pipeline alike. The update is `guard.update`: a step whose loss, gradients or new state
  are not finite leaves the state untouched and counts in `state.skipped`. `faults` is
  test-only fault injection (rec_llm/train/faults.py). `value_and_grad` replaces
  `jax.value_and_grad(loss_fn, has_aux=True)` (the pipeline's). `grad_shardings` (ZeRO):
  the gradients' layout, split over 'data' like the optimizer state, so that each device
  updates only its shard (and XLA may reduce-scatter; XLA:CPU all-reduces, then slices)."""
  base_rng = jax.random.PRNGKey(seed)
  value_and_grad = value_and_grad or jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(base_rng, state.step) if dropout else None
    batch = with_step(batch, state.step, head)
    (loss, aux), grads = value_and_grad(state.params, batch, model, head, rng)
    if grad_shardings is not None:
      grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
    step_tx = tx
    if faults is not None:
      loss, grads = faults.gradients_at(state.step, loss, grads)
      step_tx = faults.optimizer(tx, state.step)
    grad_norm = optax.tree.norm(grads)
    ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    params, opt_state, ok = guard.update(step_tx, grads, state.opt_state, state.params, ok)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           skipped=state.skipped + (~ok).astype(jnp.int32))
    metrics = {"loss": loss, "grad_norm": grad_norm, "skipped": new_state.skipped, **aux}
    return new_state, metrics

  return train_step
