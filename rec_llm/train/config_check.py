"""Validate a run config up front, so bad input fails in one clear line, not deep in XLA."""

from ml_collections import ConfigDict

from rec_llm.data import sources
from rec_llm.errors import ConfigError
from rec_llm.models.seq_transformer import ModelConfig
from rec_llm.parallel import mesh as mesh_lib


def _positive(cfg: ConfigDict, section: str, *names: str) -> None:
  for n in names:
    v = cfg[section][n]
    if not isinstance(v, (int, float)) or v <= 0:
      raise ConfigError(f"{section}.{n}={v!r} must be a positive number")


def model_config(config: ConfigDict) -> ModelConfig:
  m = config.model
  return ModelConfig(
      num_items=sources.num_items(config.data), num_layers=m.num_layers, d_model=m.d_model,
      num_heads=m.num_heads, mlp_dim=m.mlp_dim, max_len=m.max_len,
      vocab_multiple=m.get("vocab_multiple", 128), dropout_rate=m.get("dropout_rate", 0.0),
      dtype=m.get("dtype", "float32"), remat=m.get("remat", False))


def check(config: ConfigDict, num_devices: int) -> tuple[tuple[int, int, int], ModelConfig]:
  """Returns the resolved (data, tensor, pipe) mesh shape and the model config, or raises."""
  for section in ("mesh", "model", "data", "train"):
    if section not in config:
      raise ConfigError(f"config has no '{section}' section; start from experiments/configs/default.py")
  shape = mesh_lib.resolve_mesh_shape(dict(config.mesh), num_devices)
  data, tensor, pipe = shape
  if pipe != 1:
    raise ConfigError(f"mesh.pipe={pipe}: pipeline parallelism is not available yet; set mesh.pipe=1")
  _positive(config, "model", "num_layers", "d_model", "num_heads", "mlp_dim", "max_len")
  _positive(config, "train", "steps", "batch_size", "learning_rate", "log_every")
  mc = model_config(config)
  if mc.num_items < 1:
    raise ConfigError(f"data.num_items={mc.num_items} must be at least 1")
  if mc.max_len < 2:
    raise ConfigError(f"model.max_len={mc.max_len} must be at least 2 (an input and a target)")
  if mc.d_model % mc.num_heads:
    raise ConfigError(f"model.d_model={mc.d_model} is not divisible by model.num_heads={mc.num_heads}")
  if mc.num_heads % tensor:
    raise ConfigError(f"model.num_heads={mc.num_heads} is not divisible by mesh.tensor={tensor}; "
                      "attention heads are split over the tensor axis")
  if mc.mlp_dim % tensor:
    raise ConfigError(f"model.mlp_dim={mc.mlp_dim} is not divisible by mesh.tensor={tensor}")
  if mc.vocab_size % tensor:
    raise ConfigError(f"the item table has {mc.vocab_size} rows, not divisible by mesh.tensor="
                      f"{tensor}; set model.vocab_multiple to a multiple of {tensor}")
  if config.train.batch_size % data:
    raise ConfigError(f"train.batch_size={config.train.batch_size} is not divisible by "
                      f"mesh.data={data}; each data replica needs the same number of rows")
  if mc.dtype not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"model.dtype={mc.dtype!r}; choose float32, bfloat16 or float16")
  if not 0.0 <= mc.dropout_rate < 1.0:
    raise ConfigError(f"model.dropout_rate={mc.dropout_rate} must be in [0, 1)")
  warmup = config.train.get("warmup_steps", 0)
  if not 0 <= warmup <= config.train.steps:
    raise ConfigError(f"train.warmup_steps={warmup} must be between 0 and train.steps={config.train.steps}")
  return shape, mc
