"""What one training step's pieces cost: FLOPs, bytes, seconds, memory, payloads.

Mirrors the code in rec_llm/models and rec_llm/parallel; the parameter arithmetic
(rec_llm/models/arithmetic.py) and the data-parallel payloads (rec_llm/parallel/payload.py)
are theirs, imported without JAX (planning needs none). Conventions:
- Per device: `n` tokens (rows x seq) of one microbatch, tensor split `t`.
- Component times use a roofline, `flops / (peak * efficiency) + bytes / (bandwidth *
  mem_efficiency) + ops * call_overhead`, for datasheet clusters. A calibrated cluster
  (this machine) interpolates its measured times instead, and uses the roofline only to
  carry them to other token counts, tensor splits and model sizes.
- Collective counts and payloads are the ones rec_llm/parallel/hlo_stats.py reads from the
  compiled HLO (README, 'Pipeline'): per block those of BLOCK_SHAPES (a transformer block: 2
  forward all-reduces of [n, d] and 2 backward, one of them 3x: the q/k/v input gradients),
  the embedding and head 1 each, the head's softmax statistics 4 x [n] f32.
"""

import dataclasses
import math

import numpy as np

from rec_llm.errors import ConfigError
from rec_llm.models import arithmetic
from rec_llm.parallel import payload, vocab_parallel
from rec_llm.sim import cluster as cluster_lib

# Item counts of the MovieLens formats (for configs whose data section has no num_items):
# GroupLens README files; 'sasrec' is the SASRec repository's ml-1m.txt.
KNOWN_ITEMS = {"ml-100k": 1682, "ml-1m": 3706, "ml-20m": 26744, "ml-25m": 59047, "sasrec": 3416}
# A fused AdamW step on an accelerator (datasheet clusters; this machine's is measured): reads
# the parameter, its gradient and both moments (16 B), writes the parameter and the moments
# (12 B), and the clipping's global norm reads the gradient once more (4 B); the non-finite
# guard reuses that norm. (The earlier 60 B, ~15 passes, was XLA:CPU's unfused count.)
OPTIMIZER_BYTES_PER_PARAM = 32

# Attention's [heads, seq, seq] scores, by implementation: (bytes moved per score in one
# forward, bytes kept per score for the backward without recomputation).
# - 'xla': rec_llm's blocks as XLA runs them: f32 scores and probabilities, ~6 passes
#   (scores, mask, max, exp, sum, normalise), scores and probabilities kept (+ the mask).
# - 'fused_softmax': Megatron-LM's fused scale-mask-softmax in 16 bits with attention
#   dropout: QK^T written (2), the softmax reads and writes (4), dropout reads, writes and
#   masks (5), PV reads (2); kept: probabilities, dropout output and mask (5).
# - 'flash': a fused (flash / splash) attention kernel: scores never leave the chip.
SCORE_BYTES = {"xla": (24, 12), "fused_softmax": (13, 5), "flash": (0, 0)}


# One block's shape by seq_transformer.BLOCKS name, per token (h: the attention width
# d_model, f: mlp_dim, d: d_model):
# (The matmuls' FLOPs come from the block's kernels, arithmetic.block_matmul_params:
# transformer q, k, v, out and the MLP's two; HSTU u, v, q, k and out, no MLP.)
# - passes: h-, f- and d-wide activations written or read by element-wise work (transformer:
#   q, k, v, attention; the MLP's input, GELU, output; 2 norms and 2 residuals ~ 12 d. HSTU:
#   u, v, q, k before and after SiLU, the attention, its norm, the gate; 1 norm, 1 residual);
# - kept: widths kept for the backward (transformer: 2 norms' inputs / outputs and residuals
#   8 d, q, k, v, attention 4 h, the MLP's 3 f; HSTU: 4 d, 11 h);
# - ops: element-wise kernels launched;
# - tensor all-reduces of [n, d] (as multiples of it) inside a forward and a backward under
#   Megatron's split, as the compiled HLO has them (tests/test_model.py counts them):
#   transformer: out and mlp_out (forward); the MLP's and the q/k/v input gradients, the
#   latter one 3x all-reduce. HSTU: out; the u/v/q/k input gradients as one 4x.
BLOCK_SHAPES = {
    "transformer": dict(h_passes=4, f_passes=4, d_passes=12,
                        h_kept=4, f_kept=3, d_kept=8, ops=15,
                        fwd_allreduces=(1, 1), bwd_allreduces=(1, 3)),
    "hstu": dict(h_passes=11, f_passes=0, d_passes=6,
                 h_kept=11, f_kept=0, d_kept=4, ops=10,
                 fwd_allreduces=(1,), bwd_allreduces=(4,)),
}


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  max_len: int
  num_items: int
  vocab_multiple: int = 128
  dtype: str = "float32"
  attention: str = "xla"  # SCORE_BYTES: how attention's scores are computed
  # How the full softmax holds its logits: 'chunked' (rec_llm's fused head, one chunk of
  # positions at a time: vocab_parallel.chunking) or 'whole' (every position's at once, as
  # Megatron-LM's vocab-parallel cross-entropy holds them).
  head: str = "chunked"
  block: str = "transformer"  # seq_transformer.BLOCKS: 'transformer' or 'hstu'
  # The head's loss: 0 a full softmax over the table; N > 0 a sampled softmax scoring N
  # negatives and the target per position (train.loss 'sampled'): the table stays whole
  # (parameters, gradient, optimizer state), only the head's scoring shrinks.
  negatives: int = 0

  @property
  def vocab_size(self) -> int:
    m = self.vocab_multiple
    return -(-(self.num_items + 1) // m) * m

  @property
  def act_bytes(self) -> int:
    return 4 if self.dtype == "float32" else 2

  @classmethod
  def from_config(cls, config, num_items: int | None = None) -> "ModelSpec":
    """From a run config (its `model` and `data` sections, as experiments/configs/default.py
    lays them out); items from `num_items`, else data.num_items for synthetic data, else the
    MovieLens format's known count."""
    m, data = config.model, config.data
    if num_items is None:
      num_items = data.num_items if data.name == "synthetic" else KNOWN_ITEMS.get(data.name)
    if not num_items:
      raise ConfigError("the config gives no item count (data.num_items); pass --num_items=N")
    spec = cls(num_layers=int(m.num_layers), d_model=int(m.d_model), num_heads=int(m.num_heads),
               mlp_dim=int(m.mlp_dim), max_len=int(m.max_len), num_items=int(num_items),
               vocab_multiple=int(m.vocab_multiple), dtype=str(m.dtype),
               negatives=_negatives(config), block=str(m.get("block", "transformer")))
    for k in ("num_layers", "d_model", "num_heads", "mlp_dim", "max_len"):
      if getattr(spec, k) <= 0:
        raise ConfigError(f"model.{k}={getattr(spec, k)} must be positive")
    if spec.d_model % spec.num_heads:
      raise ConfigError(f"model.d_model={spec.d_model} is not divisible by model.num_heads={spec.num_heads}")
    return spec

  def to_dict(self) -> dict:
    out = {**dataclasses.asdict(self), "vocab_size": self.vocab_size}
    if not self.negatives:  # full softmax: the dict as before the field existed
      del out["negatives"]
    if self.block == "transformer":  # likewise
      del out["block"]
    return out


def _negatives(config) -> int:
  """Negatives per position of a run config's sampled softmax; 0 for the full softmax (and
  configs without train.loss)."""
  train = config.get("train") or {}
  if train.get("loss", "softmax") != "sampled":
    return 0
  n = int(train.get("negatives", 0))
  if n <= 0:
    raise ConfigError(f"train.loss='sampled' needs train.negatives > 0, not {n}")
  return n


def head_scored(m: ModelSpec, t: int) -> float:
  """Items one tensor shard scores per position: its V/t table rows (full softmax), or its
  share of the sampled negatives plus the target (each shard scores the negatives drawn
  from its own rows; the target's logit comes in by a psum)."""
  return m.negatives / t + 1 if m.negatives else m.vocab_size / t




def _roofline_parts(m: ModelSpec, comp: str, seq: int, t: int, sp: bool = False) -> dict:
  """Per token, one device: flops, bytes split over t, bytes replicated; per call: dense bytes.

  'block_fwd' / 'block_bwd', 'attention_core' (the scores, softmax and weighted values of
  one forward, inside 'block_fwd': what selective recomputation repeats), 'embed' (forward +
  backward), 'head' (norm + vocab-parallel softmax cross-entropy, forward + backward: the
  last stage runs both in one tick).
  Element-wise byte counts are estimates (passes over each activation); calibrated clusters
  only use their ratios. `sp` (sequence parallelism): the [d]-wide element-wise work (norms,
  residuals) is split over t too.
  """
  d, f, h, H, V, e = m.d_model, m.mlp_dim, m.d_model, m.num_heads, m.vocab_size, m.act_bytes
  core_flops, core_bytes = 4 * seq * h, SCORE_BYTES[m.attention][0] * H * seq
  if comp == "attention_core":
    return dict(flops=core_flops / t, split=core_bytes / t, rep=0.0, dense=0.0, ops=0)
  if comp in ("block_fwd", "block_bwd"):
    k = 1 if comp == "block_fwd" else 2  # backward: twice the forward's matmuls and passes
    b = BLOCK_SHAPES[m.block]
    return dict(flops=k * (2 * arithmetic.block_matmul_params(m) + core_flops) / t,
                split=k * (e * (b["h_passes"] * h + b["f_passes"] * f) + core_bytes) / t,
                rep=k * e * b["d_passes"] * d / (t if sp else 1), dense=0.0, ops=b["ops"] * k)
  if comp == "embed":
    # vocab-parallel gather + psum, scale, positions, mask; backward scatter-adds into a
    # dense zero table shard (written and accumulated once per call)
    return dict(flops=0.0, split=0.0, rep=6 * e * d, dense=3 * 4 * V * d / t, ops=12)
  if comp == "head":
    # logits [n, scored] in f32 (head_scored: V/t, or the sampled negatives): ~8 passes
    # (mask, max, exp, sum, rank, grad). Full softmax: the table read twice and its gradient
    # written by the matmuls; sampled: only the drawn rows are read, but the table's
    # gradient is still a dense shard (zeroed, then scatter-added into): written once.
    s = head_scored(m, t)
    return dict(flops=6 * d * s, split=8 * 4 * s, rep=6 * e * d,
                dense=(4 if m.negatives else 3 * 4) * V * d / t, ops=30)
  raise ValueError(f"unknown component {comp!r}")


def compute_share(c: cluster_lib.Cluster, m: ModelSpec, t: int = 1, sp: bool = False) -> float:
  """The share of a block's forward + backward roofline time spent on arithmetic (the rest:
  memory traffic), on the cluster's nominal device: how a slower device's FLOP/s and
  bandwidth combine (Cluster.effective_speeds)."""
  flops = mem = 0.0
  for comp in ("block_fwd", "block_bwd"):
    f, b = _per_token_seconds(c, _roofline_parts(m, comp, m.max_len, t, sp))
    flops, mem = flops + f, mem + b
  return flops / (flops + mem)


def _per_token_seconds(c: cluster_lib.Cluster, p: dict) -> tuple[float, float]:
  """(arithmetic, memory traffic) seconds per token of roofline parts `p`."""
  return (p["flops"] / (c.peak_flops * c.efficiency),
          (p["split"] + p["rep"]) / (c.memory_bandwidth * c.mem_efficiency))


def roofline_time(c: cluster_lib.Cluster, m: ModelSpec, comp: str, n: float, t: int,
                  sp: bool = False) -> float:
  p = _roofline_parts(m, comp, m.max_len, t, sp)
  return (p["ops"] * c.call_overhead + elementwise_time(c, p["dense"])
          + n * sum(_per_token_seconds(c, p)))


_MEASURED = {"block_fwd": ("block", "fwd_s"), "block_bwd": ("block", "bwd_s"),
             "embed": ("embed", "fwd_bwd_s"), "head": ("head", "fwd_bwd_s")}


def component_time(c: cluster_lib.Cluster, m: ModelSpec, comp: str, n: float, t: int = 1,
                   busy: bool = False, sp: bool = False) -> float:
  """Seconds one device (alone, at speed 1) spends on `comp` for n tokens with tensor split t;
  `busy`: the host seconds per device op while every device of a shared host is busy
  (measure.busy_components), where the calibration has them.

  Calibrated clusters interpolate the times measured for that tensor split's shard (linear
  in tokens between the measured points; the nearest measured split otherwise) and carry
  them to another model or split by the roofline's ratio.
  """
  if n <= 0:
    return 0.0
  comps = c.components or {}
  tables = (comps.get("busy") or {}).get("tables") if busy else comps.get("tables")
  if not tables:
    return roofline_time(c, m, comp, n, t, sp)
  t_ref = min((int(k) for k in tables), key=lambda k: (abs(math.log(k / t)), k))
  table = tables[str(t_ref)][_MEASURED[comp][0]]
  ref = ModelSpec(**{k: v for k, v in c.components["model"].items() if k != "vocab_size"})
  tokens = np.asarray(table["tokens"], float)
  times = np.asarray(table[_MEASURED[comp][1]], float)
  if n <= tokens[-1]:
    base = float(np.interp(n, tokens, times))
  else:  # beyond the largest measurement: the last segment's slope
    slope = (times[-1] - times[-2]) / (tokens[-1] - tokens[-2])
    base = float(times[-1] + slope * (n - tokens[-1]))
  if n < tokens[0]:  # below the smallest: scale the smallest down, keeping half as overhead
    base = float(times[0] * (0.5 + 0.5 * n / tokens[0]))
  if m == ref and t == t_ref:
    return base
  return base * roofline_time(c, m, comp, n, t, sp) / roofline_time(c, ref, comp, n, t_ref)


def attention_core_time(c: cluster_lib.Cluster, m: ModelSpec, n: float, t: int = 1) -> float:
  """One forward of attention's core (scores, softmax, weighted values) for n tokens: what
  selective recomputation repeats in the backward (Korthikanti et al. 2022)."""
  return roofline_time(c, m, "attention_core", n, t)


def host_speedup(c: cluster_lib.Cluster, busy: int) -> float:
  """How much faster a shared host runs `busy` devices' work at once than one after another.

  Virtual CPU devices share the host's cores: a single device already uses them all for
  its larger ops (XLA's intra-op threads), so devices at once gain little: their
  single-device times add up, divided by the measured speedup (measure.host_speedup: 8
  devices running the model at once vs one device; about 1.1 on the project's machine).
  """
  if not c.shared_host or busy <= 1:
    return 1.0
  # Processes sharing the host also slow each other (fitted: calibrate.py).
  return c.host_speedup / c.process_compute_scale


def optimizer_time(c: cluster_lib.Cluster, params: float) -> float:
  """AdamW update (with clipping and the non-finite guard) of `params` on one device."""
  if c.optimizer_s_per_param:
    return params * c.optimizer_s_per_param
  return params * OPTIMIZER_BYTES_PER_PARAM / (c.memory_bandwidth * c.mem_efficiency)


def elementwise_time(c: cluster_lib.Cluster, nbytes: float) -> float:
  return nbytes / (c.memory_bandwidth * c.mem_efficiency)


# ---- activations and memory ----

def block_activation_bytes(m: ModelSpec, t: int, sp: bool = False,
                           scores: bool = True) -> float:
  """Bytes per token one block keeps for its backward (no remat): norms and residuals [d]
  (split over t too with sequence parallelism, `sp`), q/k/v/attention [h/t], the MLP's [f/t]
  before and after GELU, and unless `scores` is False (selective recomputation), the scores
  and probabilities [heads/t, seq] (SCORE_BYTES: f32 scores and probabilities in rec_llm)."""
  d, f, h, H, e = m.d_model, m.mlp_dim, m.d_model, m.num_heads, m.act_bytes
  b = BLOCK_SHAPES[m.block]
  return (e * (b["d_kept"] * d / (t if sp else 1) + b["h_kept"] * h / t + b["f_kept"] * f / t)
          + scores * SCORE_BYTES[m.attention][1] * H * m.max_len / t)


def head_transient_bytes(m: ModelSpec, t: int, tokens: float) -> float:
  """The head's live bytes for `tokens` positions on one device: f32 logits of the items
  scored (head_scored), their exponentials and gradient. A sampled head (or a 'whole'
  one) holds them for every position; the full softmax for one chunk of positions at a
  time (vocab_parallel.chunking), plus per position its sorted hidden state and gradient
  and its log-sum-exp, nll and rank."""
  if m.negatives or m.head == "whole":
    return tokens * 3 * 4 * head_scored(m, t)
  rows = vocab_parallel.chunking(max(int(tokens), 1))[1]
  return rows * 3 * 4 * head_scored(m, t) + tokens * (2 * 4 * m.d_model + 12)


# ---- data-parallel compression ----

# Element-wise passes over the gradient (f32) to encode + decode one payload: for top-k with
# the selection (a partial sort: ~log2(1/ratio) passes, taken as 8); random-k adds the
# residual, gathers k entries and zeroes them; PowerSGD adds the residual and forms the
# approximation and the new residual (its matmuls are counted apart).
_COMPRESS_PASSES = {"none": 0, "int8": 4, "sign": 4, "qsgd": 5, "topk": 10, "randomk": 3,
                    "powersgd": 4}


def compression_time(c: cluster_lib.Cluster, shapes, kind: str, rank: int = 4) -> float:
  """Seconds one device spends compressing and decompressing gradient leaves of `shapes`."""
  numel = sum(math.prod(s) for s in shapes)
  t = elementwise_time(c, _COMPRESS_PASSES[kind] * 4 * numel)
  if kind == "powersgd":  # P = M Q, Q = M^T P: 2 matmuls of 2 * rows * cols * rank FLOPs
    lays = [payload.powersgd_layout(s, rank) for s in shapes]
    t += sum(4 * a * b * r for a, b, r in filter(None, lays)) / (c.peak_flops * c.efficiency)
  return t
