"""dp.zero: state sharded over 'data' (ZeRO-1: optimizer state; ZeRO-3/FSDP: parameters too)
computes what one device computes, and each device holds 1/data of the sharded state, as the
compiled program's own memory analysis shows.

Tolerance `LAYOUT_RTOL` (tests/helpers.py): sharding state changes only where the update is
computed and the order of the gradients' float32 sums.
"""

import math

import jax
import numpy as np
import pytest

from rec_llm.errors import ConfigError
from rec_llm.models import arithmetic
from rec_llm.parallel import sharding
from rec_llm.sim.measure import held_bytes
from rec_llm.train import config_check, trainer
from tests import numerics
from tests.helpers import LAYOUT_RTOL, step_losses, tiny_config

STEPS = 3
# (2, 2, 2) with 3 blocks: stages of 2 and 1 (stage-local, in slots), GPipe (1F1B with ZeRO-1
# and uneven stage-local stages: tests/test_launch.py, over 2 processes).
CASES = [(1, (4, 2, 1)), (3, (4, 2, 1)), (1, (2, 2, 2))]


def _config(zero, mesh, layers=3):
  c = tiny_config(data=mesh[0], tensor=mesh[1], pipe=mesh[2])
  c.dp.zero = zero
  c.model.num_layers = layers
  c.pipeline.schedule = "gpipe"
  return c


@pytest.fixture(scope="module")
def reference():
  return step_losses(trainer.build(_config(0, (1, 1, 1)), jax.devices()[:1]), STEPS)[0]


@pytest.mark.parametrize("zero,mesh", CASES, ids=[f"zero{z}-{'x'.join(map(str, m))}" for z, m in CASES])
def test_zero_matches_single_device(reference, zero, mesh):
  losses, _ = step_losses(trainer.build(_config(zero, mesh)), STEPS)
  numerics.check_close("losses", losses, reference, LAYOUT_RTOL * np.abs(reference))


@pytest.mark.parametrize("mesh", [(4, 2, 1)])
def test_each_device_holds_its_share(mesh):
  runs = {z: trainer.build(_config(z, mesh)) for z in (0, 1, 3)}
  data = mesh[0]
  for z, part in ((1, "opt_state"), (3, "opt_state"), (3, "params")):
    plain = jax.tree.leaves(getattr(runs[0].state, part))
    split = jax.tree.leaves(getattr(runs[z].state, part))
    ratios = [held_bytes(a) / held_bytes(b) for a, b in zip(plain, split)]
    assert set(ratios) <= {1.0, float(data)}, (z, part, set(ratios))
    # What stays whole: the leaves without an 'embed' axis (biases, the step count).
    whole = [a for a, r in zip(plain, ratios) if r == 1.0]
    assert sum(held_bytes(a) for a in whole) < 0.05 * held_bytes(plain), (z, part)
  assert held_bytes(runs[1].state.params) == held_bytes(runs[0].state.params)
  # The simulator's arithmetic counts the same per-device parameters.
  mc = runs[0].model_cfg
  for z, data_split in ((0, 1), (3, data)):
    shapes = arithmetic.param_shapes(mc, tensor=mesh[1], data=data_split)
    assert 4 * sum(math.prod(s) for s in shapes.values()) == held_bytes(runs[z].state.params)
  # The compiled step's arguments are exactly the state and batch each device holds.
  for z, run in runs.items():
    batch = run.batches(0)
    compiled = run.compile().executables[batch["inputs"].shape[1]]
    args = compiled.memory_analysis().argument_size_in_bytes
    assert args == held_bytes(run.state) + held_bytes(batch), (z, args)


def test_zero1_composes_with_the_explicit_dp_step():
  # Local SGD's outer step over int8 ring-reduced deltas: compression, a hand-written
  # aggregator and an asynchronous mode at once. Its updates are not one device's, so the
  # reference is the same step with replicated state: only where each update element is
  # computed differs. (Stale + int8 ring and local SGD + top-k: bit-equal too, measured.)
  got, held = {}, {}
  for zero in (0, 1):
    c = tiny_config(data=4, tensor=2)
    c.dp.update(zero=zero, mode="local_sgd", local_steps=2, aggregator="ring")
    c.dp.compression.kind = "int8"
    got[zero], state = step_losses(trainer.build(c), STEPS)
    held[zero] = held_bytes(state.opt_state)
  numerics.check_close("losses", got[1], got[0], LAYOUT_RTOL * np.abs(got[0]))
  assert held[1] < 0.3 * held[0], held  # 1/4 of it, plus the few leaves without 'embed'


BAD = [
    (dict(zero=2), (4, 2, 1), "dp.zero=2 is unknown"),
    (dict(zero=1, d_model=60, num_heads=6), (8, 1, 1), "does not divide"),
    (dict(zero=3, kind="int8"), (4, 2, 1), "the explicit data-parallel step takes dp.zero=1"),
    (dict(zero=3), (2, 2, 2), "dp.zero=3 with mesh.pipe=2"),
]


@pytest.mark.parametrize("edit,mesh,needle", BAD, ids=[b[2][:20] for b in BAD])
def test_bad_zero_settings_are_refused(edit, mesh, needle):
  c = _config(edit.pop("zero"), mesh)
  if "kind" in edit:
    c.dp.compression.kind = edit.pop("kind")
  c.model.update(edit)
  with pytest.raises(ConfigError, match=needle):
    config_check.check(c, 8)


def test_state_rules_split_only_embed():
  rules = dict(sharding.state_rules(True))
  assert rules["embed"] == "data"
  assert {k: v for k, v in rules.items() if k != "embed"} == {
      k: v for k, v in sharding.LOGICAL_RULES if k != "embed"}


@pytest.mark.parametrize("layers,stage_layers,adaptive,switch,slots",
                         [(4, (), False, True, 1), (5, (2, 1, 1, 1), False, True, 2),
                          (4, (), True, True, 1), (4, (), False, False, 4)],
                         ids=["even", "uneven", "adaptive", "switched_off"])
def test_pipeline_stages_hold_only_their_blocks(layers, stage_layers, adaptive, switch, slots):
  # A stage holds its own blocks and their moments: uneven stages in max(stage_layers) slots
  # (the padding zero); pipeline.stage_local=False keeps every block on every stage.
  c = _config(0, (2, 1, 4))
  c.model.num_layers = layers
  c.pipeline.update(stage_layers=stage_layers, stage_local=switch)
  c.balance.adaptive = adaptive
  run = trainer.build(c)
  one_block = 4 * arithmetic.block_params(run.model_cfg)
  is_block = run.layout.blocks
  blocks = [x for x, b in zip(jax.tree.leaves(run.state.params), jax.tree.leaves(is_block.params)) if b]
  mu = [x for x, b in zip(jax.tree.leaves(run.state.opt_state), jax.tree.leaves(is_block.opt_state))
        if b]
  assert len(mu) == 2 * len(blocks)  # AdamW's two moments of each block leaf
  assert held_bytes(blocks) == slots * one_block
  assert held_bytes(mu) == 2 * slots * one_block
  shapes = arithmetic.param_shapes(run.model_cfg, layers=slots)
  assert 4 * sum(math.prod(s) for s in shapes.values()) == held_bytes(run.state.params)
  canonical = run.layout.canonical(run.state.params, "params")["blocks"]
  assert {x.shape[0] for x in jax.tree.leaves(canonical)} == {layers}
