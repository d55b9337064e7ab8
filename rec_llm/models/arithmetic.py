"""SeqTransformer's parameter shapes, counts and FLOPs per token, without JAX.

The one place this arithmetic lives: seq_transformer.py (the MFU of real runs) and
rec_llm/sim (planning, which must not need JAX) both use it. `param_shapes` is the model's
parameter tree as `SeqTransformer.init` builds it (blocks stacked on a leading 'layers' dim),
whole or one device's shard under a tensor split; tests/test_model.py checks it against
`jax.eval_shape` of the init and the parameter shardings.

`m` is a seq_transformer.ModelConfig or a rec_llm.sim.cost_model.ModelSpec: anything with
num_layers, d_model, num_heads, mlp_dim, max_len, num_items and vocab_size (and `block`:
'transformer' if absent).
"""

import math

# Logical axes split over 'tensor' (rec_llm/parallel/sharding.py LOGICAL_RULES; everything
# else is replicated over it): the heads, the MLP's hidden units and the item table's rows.
TENSOR_SPLIT = ("heads", "mlp", "vocab")
# The logical axis that ZeRO / FSDP (dp.zero) splits state along over 'data'
# (sharding.STATE_SPLIT): every matrix, table and norm has it; some biases do not.
ZERO_SPLIT = "embed"
TABLE = "item_embedding"


def param_axes(m) -> dict[str, tuple[tuple[int, str], ...]]:
  """Parameter path ('blocks/query/kernel', ...) -> its dims as (size, logical axis), in
  the order jax.tree flattens the parameter dict."""
  L, d = m.num_layers, m.d_model
  heads = ((m.num_heads, "heads"), (d // m.num_heads, "head_dim"))
  emb = ((d, "embed"),)
  block = _block_axes(m, emb, heads)
  out = {}
  for name in sorted(block):
    leaves = block[name] if isinstance(block[name], dict) else {"": block[name]}
    for leaf in sorted(leaves):
      out[f"blocks/{name}" + (f"/{leaf}" if leaf else "")] = ((L, "layers"),) + leaves[leaf]
  out[TABLE] = ((m.vocab_size, "vocab"), (d, "embed"))
  out["ln_final/bias"] = out["ln_final/scale"] = emb
  out["pos_embedding"] = ((m.max_len, "seq"), (d, "embed"))
  return out


def _block_axes(m, emb, heads) -> dict:
  """One block's parameters (module -> leaf -> dims, or a leaf's dims) by `m.block`."""
  norm = {"bias": emb, "scale": emb}
  project = {"bias": heads, "kernel": emb + heads}  # embed -> heads x head_dim
  out = {"kernel": heads + emb, "bias": emb}
  if getattr(m, "block", "transformer") == "hstu":  # no MLP; a per-head relative position bias
    return {"gate": project, "key": project, "ln_attn": norm, "out": out, "query": project,
            "rel_bias": ((m.num_heads, "heads"), (m.max_len, "seq")), "value": project}
  mlp = ((m.mlp_dim, "mlp"),)
  return {"key": {"kernel": emb + heads}, "ln_attn": norm, "ln_mlp": norm,
          "mlp_in": {"bias": mlp, "kernel": emb + mlp},
          "mlp_out": {"bias": emb, "kernel": mlp + emb},
          "out": out, "query": project, "value": project}


def multiplies(path: str) -> bool:
  """Whether a leaf multiplies its input (the kernels and norm scales), so that the backward
  needs its value; biases and the position table only add. (The item table multiplies too,
  but the vocab-parallel kernels keep the forward's copy for the backward.)"""
  return path.endswith(("kernel", "scale"))


def param_shapes(m, tensor: int = 1, layers: int | None = None,
                 data: int = 1) -> dict[str, tuple[int, ...]]:
  """Parameter path -> shape on one device when the TENSOR_SPLIT dims are split over
  `tensor` devices (1: the whole parameter) and the ZERO_SPLIT dim over `data` (ZeRO-sharded
  state; 1: none); `layers`: the stacked block count (e.g. one pipeline stage's; default all)."""
  out = {}
  for path, dims in param_axes(m).items():
    shape = []
    for size, axis in dims:
      if axis == "layers" and layers is not None:
        size = layers
      n = (tensor if axis in TENSOR_SPLIT else 1) * (data if axis == ZERO_SPLIT else 1)
      if size % n:
        raise ValueError(f"{n} devices do not divide the {size} {axis!r} of {path}")
      shape.append(size // n)
    out[path] = tuple(shape)
  return out


def _numel(shapes: dict, prefix: str = "", suffix: str = "") -> int:
  return sum(math.prod(s) for p, s in shapes.items()
             if p.startswith(prefix) and p.endswith(suffix))


def block_params(m, tensor: int = 1) -> int:
  """Parameters of one block on one device (heads and mlp split over `tensor`)."""
  return _numel(param_shapes(m, tensor, layers=1), "blocks/")


def shared_params(m, tensor: int = 1) -> int:
  """Parameters outside the blocks on one device: item table (rows split over `tensor`),
  positions, final norm."""
  shapes = param_shapes(m, tensor, layers=0)
  return _numel(shapes) - _numel(shapes, "blocks/")


def table_params(m, tensor: int = 1) -> int:
  """The item table's parameters on one device."""
  return math.prod(param_shapes(m, tensor, layers=0)[TABLE])


def count_params(m) -> dict[str, int]:
  """Parameter counts by group (biases and norms included): the item and position
  embeddings; the blocks with the final norm."""
  shapes = param_shapes(m)
  embedding = _numel(shapes, TABLE) + _numel(shapes, "pos_embedding")
  return {"embedding": embedding, "blocks": _numel(shapes) - embedding}


def block_matmul_params(m) -> int:
  """The weights of one block's matmuls (its kernels), whole: 2 FLOPs each per token."""
  return _numel(param_shapes(m, layers=1), "blocks/", "kernel")


def flops_per_token(m, seq_len: int, negatives: int = 0) -> float:
  """Training FLOPs per token (forward + backward = 3x forward, multiply-add = 2 FLOPs).

  6 * (block matmul weights) + 6 * d * scored (the tied item-scoring head: items + 1 rows,
  not the padding, or with a sampled softmax the `negatives` and the target) + 12 * L * S * d
  (attention scores and weighted values, counted over the full S x S square as in PaLM).
  The embedding gather, norms and softmax are not counted.
  """
  matmul = m.num_layers * block_matmul_params(m)
  scored = negatives + 1 if negatives else m.num_items + 1
  return 6.0 * matmul + 6.0 * m.d_model * scored + 12.0 * m.num_layers * seq_len * m.d_model
