"""Validate a run config up front, so bad input fails in one clear line, not deep in XLA."""

import difflib
import math
import numbers

from ml_collections import ConfigDict

from rec_llm.data import sources
from rec_llm.errors import ConfigError
from rec_llm.models import seq_transformer
from rec_llm.models.seq_transformer import ModelConfig
from rec_llm.parallel import mesh as mesh_lib
from rec_llm.parallel import collectives, compression, sampled_softmax, schedules, sharding
from rec_llm.parallel.payload import DP_MODES
from rec_llm.train import dp_step, optimizer


LOSSES = ("softmax", "sampled")

# Every float setting: (lower, upper, lower included, upper included, what it is). A value
# outside its interval, or any float anywhere in the config that is NaN or infinite, is
# refused before anything runs: a NaN learning rate trains a NaN model.
INF = math.inf
FLOAT_RANGES = {
    "train.learning_rate": (0, INF, False, False, "the peak learning rate, e.g. 1e-3"),
    "train.weight_decay": (0, INF, True, False, "AdamW's decoupled weight decay"),
    "train.b1": (0, 1, True, False, "Adam's first-moment decay, e.g. 0.9"),
    "train.b2": (0, 1, True, False, "Adam's second-moment decay, e.g. 0.98"),
    "train.momentum": (0, 1, True, False, "heavy-ball momentum of train.optimizer='sgd'"),
    "train.grad_clip": (0, INF, True, False, "global-norm clipping, 0 for none"),
    "train.end_lr_fraction": (0, 1, True, True, "the final learning rate / the peak"),
    "train.peak_tflops": (0, INF, True, False, "per-device peak for MFU, 0 to look it up"),
    "model.temperature": (0, INF, True, False, "0 for dot-product scores, t > 0 for cos / t"),
    "model.dropout_rate": (0, 1, True, False, "the dropout probability"),
    "dp.outer_lr": (0, INF, False, False, "DiLoCo's outer learning rate, e.g. 0.7"),
    "dp.outer_momentum": (0, 1, True, False, "DiLoCo's outer Nesterov momentum, e.g. 0.9"),
    "dp.compression.ratio": (0, 1, False, True, "the fraction of gradient entries sent"),
    "dp.compression.momentum": (0, 1, True, False, "DGC's momentum, 0 for plain top-k"),
    "data.zipf_a": (0, INF, False, False, "the synthetic popularity exponent"),
    "data.p_follow": (0, 1, True, True, "the synthetic probability of a learnable successor"),
    "balance.min_gain": (0, INF, True, False, "the smallest relative step-time gain acted on"),
    "balance.fixed_cost_s": (-1, INF, True, False, "a re-partition's cost, -1 to measure it"),
}


def _floats(cfg, prefix=""):
  """(dotted path, value) of every float in a (nested) config."""
  for key, value in cfg.items():
    path = f"{prefix}{key}"
    if isinstance(value, (ConfigDict, dict)):
      yield from _floats(value, path + ".")
    elif isinstance(value, numbers.Real) and not isinstance(value, (bool, numbers.Integral)):
      yield path, float(value)


def _get(cfg, path):
  for key in path.split("."):
    if not isinstance(cfg, (ConfigDict, dict)) or key not in cfg:
      return None
    cfg = cfg[key]
  return cfg


def check_floats(config: ConfigDict) -> None:
  """Each float in FLOAT_RANGES lies in its interval (NaN lies in none), and every other
  float is finite."""
  for path, (lo, hi, lo_in, hi_in, what) in FLOAT_RANGES.items():
    v = _get(config, path)
    if v is None or isinstance(v, bool) or not isinstance(v, numbers.Real):
      continue
    if not ((lo <= v if lo_in else lo < v) and (v <= hi if hi_in else v < hi)):
      interval = f"{'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
      raise ConfigError(f"{path}={v!r} must be in {interval} ({what})")
  for path, v in _floats(config):
    if not math.isfinite(v):
      raise ConfigError(f"{path}={v!r} is not a finite number; set a finite value")


# Sections every run config has (`eval` is optional: without it nothing is evaluated).
SECTIONS = ("mesh", "model", "pipeline", "dp", "balance", "data", "train", "checkpoint")


def check_fields(config: ConfigDict, schema: ConfigDict, prefix: str = "") -> None:
  """Every field of `schema` (experiments/configs/default.py: the one place a default is
  written) is in `config` and no other: one ConfigError naming a missing or unknown key."""
  for key in schema:
    if key not in config:
      raise ConfigError(f"the config lacks {prefix}{key}; start from experiments/configs/"
                        f"default.py (which sets {prefix}{key}={schema[key]!r})")
  for key in config:
    if key not in schema:
      near = difflib.get_close_matches(key, list(schema), n=1)
      hint = f"; did you mean {prefix}{near[0]}?" if near else ""
      raise ConfigError(f"unknown config key {prefix}{key}{hint}")
    if isinstance(schema[key], ConfigDict) and isinstance(config[key], ConfigDict):
      check_fields(config[key], schema[key], f"{prefix}{key}.")


def _positive(cfg: ConfigDict, section: str, *names: str) -> None:
  for n in names:
    v = cfg[section][n]
    if not isinstance(v, (int, float)) or v <= 0:
      raise ConfigError(f"{section}.{n}={v!r} must be a positive number")


def model_config(config: ConfigDict, num_items: int) -> ModelConfig:
  m = config.model
  return ModelConfig(
      num_items=num_items, num_layers=m.num_layers, d_model=m.d_model,
      num_heads=m.num_heads, mlp_dim=m.mlp_dim, max_len=m.max_len,
      vocab_multiple=m.vocab_multiple, dropout_rate=m.dropout_rate, dtype=m.dtype,
      remat=m.remat, temperature=float(m.temperature), scan_unroll=int(m.scan_unroll),
      causal_blocks=int(m.causal_blocks), block=str(m.get("block", "transformer")),
      dropout_bits=str(m.dropout_bits))


def check(config: ConfigDict, num_devices: int) -> tuple[int, int, int]:
  """Checks everything that needs no data; returns the resolved (data, tensor, pipe) shape."""
  for section in SECTIONS:
    if section not in config:
      raise ConfigError(f"config has no '{section}' section; start from experiments/configs/default.py")
  shape = mesh_lib.resolve_mesh_shape(dict(config.mesh), num_devices)
  data, tensor, pipe = shape
  _positive(config, "model", "num_layers", "d_model", "num_heads", "mlp_dim", "max_len")
  _positive(config, "train", "steps", "batch_size", "log_every")
  check_floats(config)
  if 0 < config.model.dropout_rate < 1 / 512:  # masks use 8 bits (seq_transformer.Dropout)
    raise ConfigError(f"model.dropout_rate={config.model.dropout_rate} rounds to 0 at the mask's "
                      "resolution of 1/256; set it to 0 or at least 1/512")
  sources.check_name(config.data.name)
  m = config.model
  if m.max_len < 2:
    raise ConfigError(f"model.max_len={m.max_len} must be at least 2 (an input and a target)")
  if m.d_model % m.num_heads:
    raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}")
  if m.num_heads % tensor:
    raise ConfigError(f"model.num_heads={m.num_heads} is not divisible by mesh.tensor={tensor}; "
                      "attention heads are split over the tensor axis")
  if m.mlp_dim % tensor:
    raise ConfigError(f"model.mlp_dim={m.mlp_dim} is not divisible by mesh.tensor={tensor}")
  if config.train.batch_size % data:
    raise ConfigError(f"train.batch_size={config.train.batch_size} is not divisible by "
                      f"mesh.data={data}; each data replica needs the same number of rows")
  if m.get("block", "transformer") not in seq_transformer.BLOCKS:
    raise ConfigError(f"model.block={m.block!r} is unknown; choose one of "
                      f"{list(seq_transformer.BLOCKS)}")
  if m.dropout_bits not in seq_transformer.DROPOUT_BITS:
    raise ConfigError(f"model.dropout_bits={m.dropout_bits!r}; choose one of "
                      f"{list(seq_transformer.DROPOUT_BITS)} (jax.random's threefry, or a "
                      "counter hash at about half the cost on CPU)")
  if m.dtype not in ("float32", "bfloat16", "float16"):
    raise ConfigError(f"model.dtype={m.dtype!r}; choose float32, bfloat16 or float16")
  check_pipeline(config, data, pipe)
  check_dp(config, data, pipe)
  bal = config.balance
  if bal.adaptive and pipe > 1:
    if bal.every_steps < 1:
      raise ConfigError(f"balance.every_steps={bal.every_steps} must be >= 1 with balance.adaptive")
    if m.num_layers < 3:
      raise ConfigError(f"balance.adaptive measures block costs on 3 stages and needs "
                        f"model.num_layers >= 3, got {m.num_layers}")
  warmup = config.train.warmup_steps
  if not 0 <= warmup <= config.train.steps:
    raise ConfigError(f"train.warmup_steps={warmup} must be between 0 and train.steps={config.train.steps}")
  nonfinite = config.train.nonfinite
  if nonfinite not in ("skip", "stop"):
    raise ConfigError(f"train.nonfinite={nonfinite!r}; choose 'skip' (drop the update) or 'stop'")
  check_loss(config.train, tensor)
  prof = tuple(config.train.profile_steps)
  if prof and not (len(prof) == 2 and 0 <= prof[0] < prof[1] <= config.train.steps):
    raise ConfigError(f"train.profile_steps={list(prof)} must be (first, last) with "
                      f"0 <= first < last <= train.steps={config.train.steps}, or () for none")
  ev = config.get("eval")
  if ev is not None:
    if ev.batch_size % data:
      raise ConfigError(f"eval.batch_size={ev.batch_size} is not divisible by mesh.data={data}")
    if any(k <= 0 for k in ev.ks):
      raise ConfigError(f"eval.ks={list(ev.ks)} must be positive cutoffs")
  if config.checkpoint.every_steps < 0:
    raise ConfigError(f"checkpoint.every_steps={config.checkpoint.every_steps} must be >= 0 "
                      "(0: only at the end)")
  return shape


def pipeline_config(config: ConfigDict) -> dict:
  """The pipeline section as a dict, stage_layers as a tuple."""
  p = dict(config.pipeline)
  p["stage_layers"] = tuple(p["stage_layers"] or ())
  return p


PRECONDITIONS = ("none", "adam")  # dp.compression.precondition


def check_dp(config: ConfigDict, data: int, pipe: int) -> None:
  """The `dp` section: compression, aggregator and mode (rec_llm/train/dp_step.py)."""
  opt = config.train.optimizer
  if opt not in optimizer.OPTIMIZERS:
    raise ConfigError(f"train.optimizer={opt!r} is unknown; choose one of {list(optimizer.OPTIMIZERS)}")
  dp = config.dp
  c = dp.compression
  kind, agg, mode = c.kind, dp.aggregator, dp.mode
  if kind not in compression.KINDS:
    raise ConfigError(f"dp.compression.kind={kind!r} is unknown; choose one of {list(compression.KINDS)}")
  if agg not in collectives.AGGREGATORS:
    raise ConfigError(f"dp.aggregator={agg!r} is unknown; choose one of {list(collectives.AGGREGATORS)}")
  if mode not in DP_MODES:
    raise ConfigError(f"dp.mode={mode!r} is unknown; choose one of {list(DP_MODES)}")
  if c.rank <= 0:
    raise ConfigError(f"dp.compression.rank={c.rank} must be a positive integer (PowerSGD rank)")
  if not 2 <= c.bits <= 8:
    raise ConfigError(f"dp.compression.bits={c.bits} must be between 2 and 8")
  if dp.staleness < 0:
    raise ConfigError(f"dp.staleness={dp.staleness} must be >= 0 (0 is synchronous)")
  if dp.local_steps < 1:
    raise ConfigError(f"dp.local_steps={dp.local_steps} must be >= 1 (1 syncs every step)")
  group = dp.group
  if agg == "hierarchical" and (group < 1 or data % group):
    raise ConfigError(f"dp.group={group} must divide mesh.data={data} for the hierarchical "
                      "aggregator (devices per node)")
  if dp_step.uses_dp_step(config) and pipe > 1:
    raise ConfigError("the dp section (compression, aggregator, stale/local_sgd) needs "
                      f"mesh.pipe=1, got {pipe}; pipelined runs use the synchronous psum")
  check_zero(config, data, pipe)
  pre = c.precondition
  if pre not in PRECONDITIONS:
    raise ConfigError(f"dp.compression.precondition={pre!r} is unknown; choose one of "
                      f"{list(PRECONDITIONS)}")
  if pre == "adam" and (opt != "adamw" or mode == "local_sgd" or c.momentum):
    raise ConfigError("dp.compression.precondition='adam' compresses each replica's AdamW "
                      "direction: it needs train.optimizer='adamw', dp.mode 'sync' or 'stale' "
                      "(local SGD keeps whole AdamW states per replica already) and "
                      f"dp.compression.momentum=0; got {opt!r}, {mode!r}, {c.momentum}")
  if kind == "topk" and agg not in ("sparse", "psum"):
    raise ConfigError(f"dp.compression.kind='topk' sends (index, value) pairs; use "
                      f"dp.aggregator='sparse' (or 'psum' for a dense comparison), not {agg!r}")


def check_zero(config: ConfigDict, data: int, pipe: int) -> None:
  """dp.zero: which layouts shard state over 'data' (rec_llm/parallel/sharding.py)."""
  zero, d = config.dp.zero, config.model.d_model
  if zero not in sharding.ZERO_STAGES:
    raise ConfigError(f"dp.zero={zero!r} is unknown; choose one of {list(sharding.ZERO_STAGES)} "
                      "(0: replicated, 1: optimizer state over data, 3: parameters too)")
  if not zero:
    return
  if d % data:
    raise ConfigError(f"dp.zero={zero} splits state over data along model.d_model={d}, which "
                      f"mesh.data={data} does not divide; pick a d_model divisible by it")
  if zero == 3 and dp_step.uses_dp_step(config):
    raise ConfigError("dp.zero=3 runs with the GSPMD step only (dp.mode='sync', "
                      "dp.aggregator='psum', no compression); the explicit data-parallel step "
                      "takes dp.zero=1")
  if zero == 3 and pipe > 1:
    raise ConfigError(f"dp.zero=3 with mesh.pipe={pipe}: the pipeline gathers parameters once "
                      "per step, not per block, so FSDP would save nothing there; use dp.zero=1 "
                      "(optimizer state) with a pipeline")


def stage_local(config: ConfigDict, shape) -> bool:
  """Whether each pipeline stage stores only its own blocks: pipe > 1 and
  pipeline.stage_local (uneven and re-balanced partitions included: rec_llm/train/
  state_layout.py)."""
  return shape[2] > 1 and pipeline_config(config)["stage_local"]


def check_pipeline(config: ConfigDict, data: int, pipe: int) -> None:
  p = pipeline_config(config)
  layers = config.model.num_layers
  if p["schedule"] not in schedules.SCHEDULES:
    raise ConfigError(f"pipeline.schedule={p['schedule']!r} is unknown; choose one of "
                      f"{list(schedules.SCHEDULES)}")
  mbs = p["microbatches"]
  if not isinstance(mbs, int) or isinstance(mbs, bool) or mbs < 1:
    raise ConfigError(f"pipeline.microbatches={mbs!r} must be a positive integer")
  for key in ("remat", "stage_local"):
    if not isinstance(p[key], bool):
      raise ConfigError(f"pipeline.{key}={p[key]!r} must be True or False")
  sizes = p["stage_layers"]
  if sizes:
    if any(not isinstance(n, int) or n < 1 for n in sizes):
      raise ConfigError(f"pipeline.stage_layers={list(sizes)}: every stage needs a positive "
                        "integer number of blocks")
    if len(sizes) != pipe:
      raise ConfigError(f"pipeline.stage_layers={list(sizes)} has {len(sizes)} stages but "
                        f"mesh.pipe={pipe}; give one block count per stage")
    if sum(sizes) != layers:
      raise ConfigError(f"pipeline.stage_layers={list(sizes)} sums to {sum(sizes)} but "
                        f"model.num_layers={layers}; make the counts add up to the blocks")
  if pipe == 1:
    return
  if pipe > layers:
    raise ConfigError(f"mesh.pipe={pipe} stages but model.num_layers={layers} blocks; use at "
                      f"most {layers} stages (each stage needs a block)")
  per_replica = config.train.batch_size // data
  if per_replica % mbs:
    raise ConfigError(f"pipeline.microbatches={mbs} does not divide the {per_replica} rows per "
                      f"data replica (train.batch_size={config.train.batch_size} / mesh.data="
                      f"{data}); pick a divisor of {per_replica}")
  if config.model.dropout_rate > 0:
    raise ConfigError(f"model.dropout_rate={config.model.dropout_rate} with mesh.pipe={pipe}: "
                      "the pipeline does not support dropout yet; set model.dropout_rate=0")


def check_loss(tc: ConfigDict, tensor: int) -> None:
  if tc.loss not in LOSSES:
    raise ConfigError(f"train.loss={tc.loss!r} is unknown; choose one of {list(LOSSES)}")
  if tc.loss == "softmax":
    return
  if tc.sampler not in sampled_softmax.SAMPLERS:
    raise ConfigError(f"train.sampler={tc.sampler!r} is unknown; choose one of "
                      f"{list(sampled_softmax.SAMPLERS)}")
  if tc.neg_share not in sampled_softmax.SHARES:
    raise ConfigError(f"train.neg_share={tc.neg_share!r} is unknown; choose 'batch' (one draw "
                      "shared by the batch) or 'row' (a draw per sequence)")
  n, g = tc.negatives, tc.neg_strata
  if n < 1 or g < 1 or n % g:
    raise ConfigError(f"train.neg_strata={g} must divide train.negatives={n} (both >= 1): "
                      "each block of the table draws negatives / neg_strata")
  if g % tensor:
    raise ConfigError(f"train.neg_strata={g} is not divisible by mesh.tensor={tensor}; each "
                      "tensor shard draws from whole strata")


def check_model(config: ConfigDict, num_items: int, tensor: int) -> ModelConfig:
  """The model config for `num_items` items (known once the data is loaded)."""
  if num_items < 1:
    raise ConfigError(f"the data has {num_items} items; it needs at least 1")
  mc = model_config(config, num_items)
  if mc.vocab_size % tensor:
    raise ConfigError(f"the item table has {mc.vocab_size} rows, not divisible by mesh.tensor="
                      f"{tensor}; set model.vocab_multiple to a multiple of {tensor}")
  g = config.train.neg_strata
  if config.train.loss == "sampled" and mc.vocab_size % g:
    raise ConfigError(f"the item table has {mc.vocab_size} rows, not divisible by "
                      f"train.neg_strata={g}; set model.vocab_multiple to a multiple of {g}")
  return mc
