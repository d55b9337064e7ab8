"""The train state as the step stores it, beside its canonical layout.

Canonical: the stacked blocks (the leaves with a leading 'layers' axis, in the parameters
and in the optimizer state alike) are [L, ...], block i in row i, whatever the mesh: what
checkpoints hold and what the evaluator and the balancer read. Stored: what the step reads
and writes. With stage-local pipeline weights over uneven stages (say stage_layers (3, 1))
the blocks are stage-major slots [P * max(stage_layers), ...] split over 'pipe'
(pipeline.to_slots), so that each stage holds exactly its own blocks and their moments;
otherwise the two layouts are the same arrays and every conversion is the identity.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax

from rec_llm.parallel import pipeline


def _restack(tree, blocks, fn):
  return jax.tree.map(lambda x, b: fn(x) if b else x, tree, blocks)


@dataclasses.dataclass
class StateLayout:
  """Conversions between the stored and the canonical train state (or its params)."""
  blocks: Any              # bools like the state: which leaves are stacked blocks
  sizes: tuple | None      # the stages' block counts when stored as slots, else None
  stored_shardings: Any
  canonical_shardings: Any
  _jitted: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

  @property
  def identity(self) -> bool:
    return self.sizes is None

  def to_stored(self, state, part: str | None = None):
    """Canonical -> stored, traceable; `part` ('params'): convert that field of the state."""
    if self.identity:
      return state
    return _restack(state, self._mask(part), lambda a: pipeline.to_slots(a, self.sizes))

  def to_canonical(self, state, part: str | None = None):
    if self.identity:
      return state
    return _restack(state, self._mask(part), lambda a: pipeline.from_slots(a, self.sizes))

  def stored(self, state, part: str | None = None):
    """`to_stored` as a jitted program onto the stored shardings."""
    return self._run(self.to_stored, self.stored_shardings, state, part)

  def canonical(self, state, part: str | None = None):
    """`to_canonical` as a jitted program onto the canonical shardings (a new copy of the
    blocks; the stored state stays valid)."""
    return self._run(self.to_canonical, self.canonical_shardings, state, part)

  def _mask(self, part):
    return self.blocks if part is None else getattr(self.blocks, part)

  def _run(self, fn, shardings, state, part):
    # One program per (direction, part), compiled once and reused at every checkpoint and
    # evaluation. (Not donating: the blocks change shape, so their buffers could not be
    # reused.)
    if self.identity:
      return state
    key = (fn.__name__, part)
    if key not in self._jitted:
      out = shardings if part is None else getattr(shardings, part)
      self._jitted[key] = jax.jit(lambda s: fn(s, part), out_shardings=out)
    return self._jitted[key](state)


def make(abstract_boxed_state, sizes, stored_shardings, canonical_shardings) -> StateLayout:
  """The layout of a state whose boxed abstract value is `abstract_boxed_state`; `sizes`:
  the stage sizes when the blocks are stored as slots (stage-local, uneven), else None."""
  specs = nn.get_partition_spec(abstract_boxed_state)
  blocks = jax.tree.map(lambda s: bool(s) and s[0] == "layers", specs,
                        is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  if sizes is not None and len(set(sizes)) == 1:
    sizes = None  # even stages: the canonical layout splits into the stages' own blocks
  return StateLayout(blocks, None if sizes is None else tuple(sizes), stored_shardings,
                     canonical_shardings)
