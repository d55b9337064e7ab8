"""A decoder-only causal transformer over item-id sequences (SASRec / HSTU family).

`model.block` picks the block: 'transformer' (pre-LN softmax attention + GELU MLP, as
SASRec) or 'hstu' (Zhai et al. 2024, "Actions Speak Louder than Words": pointwise SiLU
attention with a relative position bias, gated by a projection U, no MLP).

Item ids are 1..num_items; 0 is padding. The model returns the final hidden states and the
item table, because scores are tied to the item embedding and the (vocab-parallel) softmax
lives with the loss.
"""

import dataclasses
import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from rec_llm.models import arithmetic
from rec_llm.parallel import vocab_parallel

Logical = nn.with_logical_partitioning
constrain = nn.with_logical_constraint


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  num_items: int
  num_layers: int
  d_model: int
  num_heads: int
  mlp_dim: int
  max_len: int
  vocab_multiple: int = 128   # table rows padded to a multiple of this, for even sharding
  dropout_rate: float = 0.0
  dtype: str = "float32"      # activations; parameters stay float32
  remat: bool = False
  # Scores: 0 -> dot product with the item table; t > 0 -> cosine similarity / t (the
  # L2-normalised, temperature-scaled scoring of the generative-recommenders baselines).
  temperature: float = 0.0
  # Blocks per iteration of the scan over layers; num_layers unrolls it, which on CPU saves
  # zero-filling the loop's stacked residuals every step (a few blocks compile quickly).
  scan_unroll: int = 1
  # Causal attention in this many query blocks, each scoring only the keys up to its end:
  # (n - 1) / 2n less attention work (n = 2: a quarter); the same result. 0: about
  # QUERY_BLOCK queries a block (query_blocks).
  causal_blocks: int = 0
  block: str = "transformer"  # or 'hstu' (BLOCKS)
  dropout_bits: str = "threefry"  # or 'hash' (DROPOUT_BITS)

  @property
  def vocab_size(self) -> int:
    m = self.vocab_multiple
    return -(-(self.num_items + 1) // m) * m

  @property
  def head_dim(self) -> int:
    return self.d_model // self.num_heads


class Dense(nn.Module):
  """x[..., *in_shape] @ kernel[*in_shape, *out_shape] + bias, with logical axis names."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  dtype: str = "float32"
  use_bias: bool = True

  @nn.compact
  def __call__(self, x):
    n_in, n_out = len(self.in_shape), len(self.out_shape)
    init = nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
        out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", Logical(init, self.in_axes + self.out_axes),
                        self.in_shape + self.out_shape)
    dt = jnp.dtype(self.dtype)
    y = jnp.tensordot(x.astype(dt), kernel.astype(dt), axes=n_in)
    if not self.use_bias:
      return y
    return y + self.param("bias", Logical(nn.initializers.zeros, self.out_axes),
                          self.out_shape).astype(dt)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  """uint32 bits from a counter hash: element i of a flat [shape] gets lowbias32(i * phi +
  seed), one scalar threefry draw for the seed. About half threefry's cost on CPU, and a
  function of the global index, so every sharding of `shape` sees the same bits. Two seeds
  give windows of one stream at a random offset (overlap: about n / 2^32). For dropout masks,
  not for anything cryptographic or statistically delicate."""
  seed = jax.random.bits(key, (), jnp.uint32)
  x = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape) * jnp.uint32(0x9E3779B9) + seed
  for shift, mul in ((16, 0x7FEB352D), (15, 0x846CA68B)):  # lowbias32 (C. Wellons)
    x = (x ^ (x >> shift)) * jnp.uint32(mul)
  return x ^ (x >> 16)


# model.dropout_bits: where Dropout's random bits come from (key, shape) -> uint32 [shape]
DROPOUT_BITS = {"threefry": partial(jax.random.bits, dtype=jnp.uint32), "hash": hash_bits}


class Dropout(nn.Module):
  """Inverted dropout whose mask costs 8 random bits an element, not nn.Dropout's 32: one
  uint32 draw masks 4 neighbours along the last axis. Random bits were a fifth of a CPU
  step's time at length 200 (attention probabilities are batch x heads x seq^2); this is
  about 3x cheaper, and `bits='hash'` (hash_bits) about 2x cheaper again. The rate is rounded
  to a multiple of 1/256 (0.2 -> 51/256 = 0.199) and the kept values scaled by the rounded
  rate's inverse, so the expectation is exact. The bits are drawn in the array's shape but
  its last axis, which no layout splits, so every sharding sees the same mask."""
  rate: float
  deterministic: bool
  bits: str = "threefry"

  @nn.compact
  def __call__(self, x):
    dropped = min(round(self.rate * 256), 255)
    if self.deterministic or dropped == 0:
      return x
    words = -(-x.shape[-1] // 4)
    bits = DROPOUT_BITS[self.bits](self.make_rng("dropout"), x.shape[:-1] + (words,))
    byte = jax.lax.bitcast_convert_type(bits, jnp.uint8).reshape(x.shape[:-1] + (4 * words,))
    keep = byte[..., :x.shape[-1]] >= dropped
    return jnp.where(keep, x * (256 / (256 - dropped)), 0).astype(x.dtype)


def _norm(name, dtype):
  return nn.LayerNorm(dtype=dtype, name=name,
                      scale_init=Logical(nn.initializers.ones, ("embed",)),
                      bias_init=Logical(nn.initializers.zeros, ("embed",)))


class Block(nn.Module):
  """Pre-LN block: heads and the MLP hidden dimension are split over tensor (Megatron)."""
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x, key_valid):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    drop = Dropout(cfg.dropout_rate, self.deterministic, cfg.dropout_bits)
    h = _norm("ln_attn", dt)(x)
    d, heads = (cfg.d_model,), (cfg.num_heads, cfg.head_dim)
    # No key bias: softmax is invariant to it, so it would be a parameter with zero gradient.
    q, k, v = (constrain(Dense(d, heads, ("embed",), ("heads", "head_dim"), cfg.dtype,
                               use_bias=(n != "key"), name=n)(h),
                         ("batch", "seq", "heads", "head_dim")) for n in ("query", "key", "value"))

    def weigh(scores, mask, lo, hi):
      scores = jnp.where(mask, scores / math.sqrt(cfg.head_dim), -1e30)
      return drop(jax.nn.softmax(scores, axis=-1).astype(dt))

    att = causal_attention(cfg, q, k, v, key_valid, weigh)
    att = Dense(heads, d, ("heads", "head_dim"), ("embed",), cfg.dtype, name="out")(att)
    x = constrain(x + drop(att), ("batch", "seq", "embed"))
    h = _norm("ln_mlp", dt)(x)
    mlp = (cfg.mlp_dim,)
    h = constrain(Dense(d, mlp, ("embed",), ("mlp",), cfg.dtype, name="mlp_in")(h),
                  ("batch", "seq", "mlp"))
    h = Dense(mlp, d, ("mlp",), ("embed",), cfg.dtype, name="mlp_out")(nn.gelu(h))
    x = constrain(x + drop(h), ("batch", "seq", "embed"))
    return x, None


class HSTUBlock(nn.Module):
  """HSTU: U, V, Q, K = SiLU(x W + b); A = SiLU(Q K^T + rab) / max_len, causal;
  x + out(Norm(A V) * U). Differences from the reference (generative-recommenders), chosen
  so that tensor parallelism needs no collective inside the attention: the output norm is
  per head and the relative position bias is per head (one head, as its ML-1M configs use:
  the same). Dividing by max_len, not the window's length, keeps a length-bucketed window
  equal to the same window left-padded. Dropout: on the gated output (the reference's
  linear dropout), not on the attention weights."""
  cfg: ModelConfig
  deterministic: bool

  @nn.compact
  def __call__(self, x, key_valid):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    h = _norm("ln_attn", dt)(x)
    d, heads = (cfg.d_model,), (cfg.num_heads, cfg.head_dim)
    u, v, q, k = (constrain(nn.silu(Dense(d, heads, ("embed",), ("heads", "head_dim"), cfg.dtype,
                                          name=n)(h)), ("batch", "seq", "heads", "head_dim"))
                  for n in ("gate", "value", "query", "key"))
    rel = self.param("rel_bias", Logical(nn.initializers.normal(0.02), ("heads", "seq")),
                     (cfg.num_heads, cfg.max_len))
    def weigh(scores, mask, lo, hi):
      # rab[h, i, j] = rel[h, i - j] for keys at or before the query (the rest are masked),
      # gathered for this query block only
      dist = jnp.arange(lo, hi)[:, None] - jnp.arange(hi)[None, :]
      scores = scores + rel[:, jnp.clip(dist, 0, cfg.max_len - 1)][None]
      return jnp.where(mask, nn.silu(scores) / cfg.max_len, 0).astype(dt)

    att = causal_attention(cfg, q, k, v, key_valid, weigh)
    # HSTU's norm of the attention output: no parameters, over each head's values
    unit = nn.LayerNorm(use_bias=False, use_scale=False, use_fast_variance=False, dtype=dt)
    gated = Dropout(cfg.dropout_rate, self.deterministic, cfg.dropout_bits)(unit(att) * u)
    y = Dense(heads, d, ("heads", "head_dim"), ("embed",), cfg.dtype, name="out")(gated)
    return constrain(x + y, ("batch", "seq", "embed")), None


BLOCKS = {"transformer": Block, "hstu": HSTUBlock}


def causal_attention(cfg: ModelConfig, q, k, v, key_valid, weigh):
  """sum_k weigh(q . k) v over the causal, key-valid keys, in query blocks (query_blocks):
  queries lo..hi-1 score only keys 0..hi-1, the rest being masked anyway. `weigh(scores,
  mask, lo, hi)` turns a block's f32 scores [batch, heads, hi - lo, hi] and its mask into
  weights in v's dtype (softmax or HSTU's SiLU)."""
  seq = q.shape[1]
  causal = jnp.tril(jnp.ones((seq, seq), bool))
  bounds = query_blocks(cfg, seq)

  def attend(lo, hi):
    mask = causal[None, None, lo:hi, :hi] & key_valid[:, None, None, :hi]
    scores = jnp.einsum("bqhd,bkhd->bhqk", q[:, lo:hi], k[:, :hi],
                        preferred_element_type=jnp.float32)
    return jnp.einsum("bhqk,bkhd->bqhd", weigh(scores, mask, lo, hi), v[:, :hi])

  return jnp.concatenate([attend(lo, hi) for lo, hi in zip(bounds, bounds[1:])], axis=1)


# Queries per causal block when model.causal_blocks is 0. n blocks do (n + 1) / 2n of the
# square's work, each at a fixed cost: on the 2-core CPU, blocks of ~50 queries (4 at length
# 200, 2 at 100) made the SASRec-sized d 50 step 7-11% faster than 2 blocks from length 128
# on (d 64 / MLP 256 and HSTU: no gain measured).
QUERY_BLOCK = 50


def query_blocks(cfg: ModelConfig, seq: int) -> list[int]:
  """Bounds of the causal attention's query blocks: [0, ..., seq] in cfg.causal_blocks
  near-equal parts (0: about QUERY_BLOCK queries each)."""
  n = cfg.causal_blocks or round(seq / QUERY_BLOCK)
  n = max(1, min(n, seq))
  return [seq * i // n for i in range(n + 1)]


def _lookup(cfg: ModelConfig, table, pos, ids):
  # Positions count back from the latest item, so a short (length-bucketed) window computes
  # exactly what the same window left-padded to max_len would.
  return (vocab_parallel.embed_lookup(table, ids) * math.sqrt(cfg.d_model)
          + pos[cfg.max_len - ids.shape[1]:])


def _mask_padding(cfg: ModelConfig, x, valid):
  return constrain((x * valid[..., None]).astype(jnp.dtype(cfg.dtype)), ("batch", "seq", "embed"))


class SeqTransformer(nn.Module):
  """Embedding -> N pre-LN blocks (scanned, stacked on 'layers') -> final norm.

  Returns (hidden, table) whose dot products are the scores; under a mesh with a sharded
  batch, `table` is `vocab_parallel.tie`'s per-shard copies, which rec_llm.parallel's
  vocab-parallel functions take as they take the table."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, ids, train: bool = False):
    cfg, dt = self.cfg, jnp.dtype(self.cfg.dtype)
    table = self.param("item_embedding", Logical(nn.initializers.normal(0.02), ("vocab", "embed")),
                       (cfg.vocab_size, cfg.d_model))
    pos = self.param("pos_embedding", Logical(nn.initializers.normal(0.02), ("seq", "embed")),
                     (cfg.max_len, cfg.d_model))
    table = vocab_parallel.tie(table)  # its lookup's and its scores' gradients reduced once
    valid = ids != 0
    x = _lookup(cfg, table, pos, ids)
    x = _mask_padding(cfg, Dropout(cfg.dropout_rate, not train, cfg.dropout_bits)(x), valid)
    block = BLOCKS[cfg.block]
    block = nn.remat(block) if cfg.remat else block
    stack = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
                    in_axes=nn.broadcast, length=cfg.num_layers, unroll=cfg.scan_unroll,
                    metadata_params={nn.PARTITION_NAME: "layers"})
    x, _ = stack(cfg, not train, name="blocks")(x, valid)
    return score_space(cfg, _norm("ln_final", dt)(x), table)


def score_space(cfg: ModelConfig, hidden, table):
  """(hidden, table) whose dot products are the scores. Normalising rows is local to each
  row, so a vocab-sharded table stays sharded."""
  if not cfg.temperature:
    return hidden, table
  unit = lambda x: x * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), -1, keepdims=True), 1e-12))
  return unit(hidden) / cfg.temperature, unit(table)


# The model cut into pieces for a pipeline (no dropout: the pipeline rejects it). They run
# the same code as SeqTransformer on its parameter tree: `params` is the whole tree, or for
# `block` one layer's slice of params['blocks'].

def embed(cfg: ModelConfig, params, ids):
  """ids [batch, seq] -> the input of the first block [batch, seq, embed]."""
  x = _lookup(cfg, params["item_embedding"], params["pos_embedding"], ids)
  return _mask_padding(cfg, x, ids != 0)


def block(cfg: ModelConfig, layer_params, x, ids):
  """One block, given its slice of the stacked params['blocks']."""
  return BLOCKS[cfg.block](cfg, deterministic=True).apply({"params": layer_params}, x, ids != 0)[0]


def final_norm(cfg: ModelConfig, params, x):
  """Final hidden states and the item table (scores are tied to it), as SeqTransformer returns."""
  return score_space(
      cfg, _norm("ln_final", jnp.dtype(cfg.dtype)).apply({"params": params["ln_final"]}, x),
      params["item_embedding"])


# Parameter counts by group and training FLOPs per token: rec_llm/models/arithmetic.py (shared
# with the simulator, which plans without JAX).
count_params = arithmetic.count_params
flops_per_token = arithmetic.flops_per_token
