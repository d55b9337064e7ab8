"""The single place where logical axis names map to mesh axes.

Models annotate parameters and activations with logical names ('batch', 'vocab', ...);
these rules decide which mesh axis (if any) shards each one.
"""

import contextlib
from typing import Any

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    ("batch", "data"),
    ("seq", None),
    ("embed", None),
    ("heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("vocab", "tensor"),   # item table rows: never replicated
    ("layers", None),      # stacked blocks, canonical [L, ...] layout: replicated
    ("stage", "pipe"),     # pipeline stages (rec_llm/parallel/pipeline.py)
)


# ZeRO / FSDP (dp.zero): state is additionally split over 'data' along the parameters'
# 'embed' dimension (every matrix, the tables and the norms have one; a few small biases do
# not and stay replicated). Only state uses these rules: activations keep 'batch -> data'.
# rec_llm/models/arithmetic.py's ZERO_SPLIT counts the same split (tests/test_zero.py).
ZERO_STAGES = (0, 1, 3)   # 0: replicated; 1: optimizer state; 3: parameters too (FSDP)
STATE_SPLIT = ("embed", "data")


# Stage-local pipeline weights: the stacked blocks' 'layers' dim split over the stages, so a
# stage holds only its own blocks (and their optimizer state). Even partitions split the
# canonical [L, ...] layout; uneven ones its stage-major slots (rec_llm/train/state_layout.py).
STAGE_SPLIT = ("layers", "pipe")


def state_rules(zero: bool, stage_local: bool = False) -> tuple[tuple[str, str | None], ...]:
  """The logical rules for train state: LOGICAL_RULES, with STATE_SPLIT when `zero` and
  STAGE_SPLIT when `stage_local`."""
  splits = dict([STATE_SPLIT] * bool(zero) + [STAGE_SPLIT] * bool(stage_local))
  return tuple((n, splits.get(n, a)) for n, a in LOGICAL_RULES)


def mesh_axis(logical: str) -> str | None:
  """The mesh axis a logical name is sharded over (None: replicated)."""
  for name, axis in LOGICAL_RULES:
    if name == logical:
      return axis
  raise KeyError(f"no sharding rule for logical axis {logical!r}")


def local_axis(logical: str) -> str | None:
  """Like `mesh_axis`, but None where the current (abstract) mesh has made that axis manual.

  Inside a `shard_map` that is manual over an axis, arrays are already local along it, so
  specs and constraints must not name it again.
  """
  axis = mesh_axis(logical)
  mesh = jax.sharding.get_abstract_mesh()
  if axis is None or mesh.empty or axis in mesh.manual_axes:
    return None
  return axis


def logical_to_spec(logical: tuple[str | None, ...]) -> P:
  return P(*(None if name is None else mesh_axis(name) for name in logical))


def named(mesh: Mesh, logical: tuple[str | None, ...]) -> NamedSharding:
  return NamedSharding(mesh, logical_to_spec(logical))


def tree_shardings(abstract_boxed_tree: Any, mesh: Mesh, zero: bool = False,
                   stage_local: bool = False) -> Any:
  """NamedShardings for a tree of (possibly) logically-partitioned abstract values; with
  `zero` / `stage_local`, also split as STATE_SPLIT / STAGE_SPLIT say."""
  specs = nn.get_partition_spec(abstract_boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, state_rules(zero, stage_local))


@contextlib.contextmanager
def manual(axes: tuple[str, ...]):
  """The logical rules inside a shard_map manual over mesh `axes`: those axes become local."""
  rules = tuple((name, None if axis in axes else axis) for name, axis in LOGICAL_RULES)
  with nn.logical_axis_rules(rules):
    yield


@contextlib.contextmanager
def activate(mesh: Mesh):
  """Makes `mesh` and the logical rules current for tracing sharded code."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
    yield
