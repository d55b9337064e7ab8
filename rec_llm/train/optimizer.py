"""AdamW with linear warmup + cosine decay and global-norm clipping."""

import jax
import optax
from ml_collections import ConfigDict

_DECAYED = ("kernel", "item_embedding", "pos_embedding")


def _decay_mask(params):
  """Weight decay on matrices and embeddings only, not on biases or norm scales."""
  def is_decayed(path, _):
    return any(getattr(k, "key", getattr(k, "name", None)) in _DECAYED for k in path)
  return jax.tree_util.tree_map_with_path(is_decayed, params)


def schedule(train_cfg: ConfigDict) -> optax.Schedule:
  warmup = int(train_cfg.warmup_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0 if warmup else train_cfg.learning_rate, peak_value=train_cfg.learning_rate,
      warmup_steps=warmup, decay_steps=max(train_cfg.steps, warmup + 1),
      end_value=train_cfg.learning_rate * train_cfg.end_lr_fraction)


OPTIMIZERS = ("adamw", "sgd")


def adam_moments(train_cfg: ConfigDict) -> optax.GradientTransformation:
  """AdamW's moments alone: gradient -> bias-corrected m / (sqrt(v) + eps)."""
  return optax.scale_by_adam(b1=train_cfg.b1, b2=train_cfg.b2)


def make(train_cfg: ConfigDict, moments: bool = True) -> optax.GradientTransformation:
  """train.optimizer: 'adamw' or 'sgd' (heavy-ball train.momentum, 0: plain, as the
  exactness checks use); clipping by global norm train.grad_clip first (0: off).

  moments=False ('adamw' only): what follows `adam_moments` in AdamW, decoupled weight
  decay and the learning-rate schedule, for updates that are already Adam directions (the
  data-parallel step's dp.compression.precondition='adam'); no clipping (a direction's
  norm says nothing about an outlier gradient)."""
  if not moments:
    return optax.chain(optax.add_decayed_weights(train_cfg.weight_decay, _decay_mask),
                       optax.scale_by_learning_rate(schedule(train_cfg)))
  clip = float(train_cfg.grad_clip)
  if train_cfg.optimizer == "sgd":
    opt = optax.sgd(schedule(train_cfg), momentum=float(train_cfg.momentum) or None)
  else:
    opt = optax.adamw(schedule(train_cfg), b1=train_cfg.b1, b2=train_cfg.b2,
                      weight_decay=train_cfg.weight_decay, mask=_decay_mask)
  return optax.chain(optax.clip_by_global_norm(clip), opt) if clip > 0 else opt
