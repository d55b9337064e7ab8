"""Pipeline parallelism: every (data, tensor, pipe) layout of 8 devices with pipe in {2, 4, 8},
GPipe and 1F1B, uniform and non-uniform stages, gives the single-device loss and gradients.

Tolerance: `LAYOUT_RTOL` (tests/helpers.py) on the loss and on every gradient in relative
norm, as in tests/test_equivalence.py: a pipeline changes only the order of float32 sums
(microbatches, stages, shards). One loss+gradient evaluation
per layout (the optimizer after it is the unchanged pipe=1 code), to keep compiles few.
"""

import jax
import numpy as np
import pytest

from rec_llm.errors import ConfigError
from rec_llm.parallel import schedules, sharding
from rec_llm.train import checkpoint, config_check, trainer
from tests import numerics
from tests.helpers import LAYOUT_RTOL, conditioned_rtol, tiny_config

LAYERS = 8
# (data, tensor, pipe, microbatches, non-uniform stage_layers)
LAYOUTS = [(4, 1, 2, 4, None), (2, 2, 2, 4, (5, 3)), (1, 4, 2, 4, None),
           (2, 1, 4, 8, (1, 3, 3, 1)), (1, 2, 4, 8, None), (1, 1, 8, 16, None)]


def _config(data=1, tensor=1, pipe=1, schedule="1f1b", microbatches=1, stage_layers=(),
            block="transformer"):
  c = tiny_config(data=data, tensor=tensor, pipe=pipe)
  c.model.update(num_layers=LAYERS, d_model=32, num_heads=4, mlp_dim=64, block=block)
  c.pipeline.update(schedule=schedule, microbatches=microbatches, stage_layers=stage_layers)
  return c


def _loss_and_grads(config, devices, params=None):
  """(loss, hr@10, grads, compiled, params) of the run's value_and_grad on batch 0, at
  `params` (host arrays: every layout starts from the same values) or the run's init."""
  run = trainer.build(config, devices, init=params is None)
  params = (run.state.params if params is None else run.layout.stored(
      jax.device_put(params, run.layout.canonical_shardings.params), "params"))
  f = jax.jit(lambda p, b: run.value_and_grad(p, b, run.model, run.model_cfg.num_items + 1))
  batch = run.batches(0)
  with sharding.activate(run.mesh):
    compiled = f.lower(params, batch).compile()
  (loss, aux), grads = compiled(params, batch)
  # Uneven stage-local stages: the blocks and their gradients are stage-major slots.
  grads, params = (run.layout.canonical(t, "params") for t in (grads, params))
  return float(loss), float(aux["hr@10"]), jax.device_get(grads), compiled, jax.device_get(params)


@pytest.fixture(scope="module")
def reference():
  return _loss_and_grads(_config(), jax.devices()[:1])


def _assert_same(got, ref, what, grad_rtol=LAYOUT_RTOL):
  loss, hr, grads = got[:3]
  numerics.check_close(f"{what} loss", loss, ref[0], LAYOUT_RTOL * abs(ref[0]))
  assert hr == ref[1], what
  numerics.check_tree_rel(f"{what} gradient", grads, ref[2], grad_rtol)


@pytest.mark.parametrize("data,tensor,pipe,mbs,uneven", LAYOUTS,
                         ids=[f"{d}x{t}x{p}" for d, t, p, _, _ in LAYOUTS])
def test_pipeline_matches_single_device(reference, data, tensor, pipe, mbs, uneven):
  temp = {}
  for stage_layers in [()] + ([uneven] if uneven else []):
    for schedule in ("gpipe", "1f1b"):
      got = _loss_and_grads(_config(data, tensor, pipe, schedule, mbs, stage_layers),
                            jax.devices(), reference[4])
      _assert_same(got, reference, f"{schedule} stages={stage_layers or 'uniform'}")
      temp[schedule, stage_layers] = got[3].memory_analysis().temp_size_in_bytes
    # microbatches >= 2 * pipe here: 1F1B holds at most `pipe` microbatches, GPipe all of them.
    assert temp["1f1b", stage_layers] < temp["gpipe", stage_layers], temp


def test_hstu_pipeline_matches_single_device():
  """HSTU blocks in uneven 1F1B stages with tensor and data splits; its gradients are worse
  conditioned, so the tolerance is measured (helpers.conditioned_rtol)."""
  ref = _loss_and_grads(_config(block="hstu"), jax.devices()[:1])
  moved = _loss_and_grads(_config(block="hstu"), jax.devices()[:1], numerics.ulp_perturbed(ref[4]))
  rtol = conditioned_rtol(numerics.max_tree_rel(moved[2], ref[2]))
  got = _loss_and_grads(_config(2, 2, 2, "1f1b", 4, (5, 3), "hstu"), jax.devices(), ref[4])
  _assert_same(got, ref, "hstu 2x2x2 stages=(5, 3)", rtol)


def test_train_steps_and_checkpoint_across_pipe(tmp_path):
  """Two optimizer steps on a 2x2x2 1F1B mesh with uneven stage-local stages equal one
  device's; the state saved there (canonical [L, ...] layout) restores onto a pipe=1 mesh and
  onto other uneven stages, bit for bit, their padding slots zero."""
  losses = {}
  for name, cfg, devs in [("ref", _config(), jax.devices()[:1]),
                          ("pipe", _config(2, 2, 2, "1f1b", 2, (3, 5)), jax.devices())]:
    run = trainer.build(cfg, devs)
    step, state = run.compile(), run.state
    out = []
    for i in range(2):
      state, m = step(state, run.batches(i))
      out.append(float(m["loss"]))
    losses[name] = (out, run.layout.canonical(state))
  assert run.layout.sizes == (3, 5)
  numerics.check_close("2x2x2 1f1b losses", losses["pipe"][0], losses["ref"][0],
                       LAYOUT_RTOL * np.abs(losses["ref"][0]))
  ck = checkpoint.Checkpointer(str(tmp_path))
  ck.save(2, losses["pipe"][1], {"step": 2, "data_position": 2, "elapsed_s": 0.0})
  ck.wait()
  saved = jax.device_get(losses["pipe"][1])
  for target in (_config(data=2, tensor=4), _config(2, 1, 4, "1f1b", 2, (1, 3, 3, 1))):
    run = trainer.build(target, jax.devices(), init=False)
    restored, _ = trainer.restore_or_init(run, ck, None)
    back = jax.device_get(run.layout.canonical(restored))
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(saved)):
      np.testing.assert_array_equal(a, b)
  slots = jax.device_get(restored.opt_state)  # (1, 3, 3, 1) in 4 x 3 slots
  for x, b in zip(jax.tree.leaves(slots), jax.tree.leaves(run.layout.blocks.opt_state)):
    if b:
      assert x.shape[0] == 12 and not x[1:3].any() and not x[10:12].any()
  ck.close()


def test_schedules_bubble_and_in_flight():
  for p, m in [(2, 4), (4, 8), (4, 4), (8, 8)]:
    g, f = schedules.build("gpipe", p, m), schedules.build("1f1b", p, m)
    assert g.in_flight == m and f.in_flight == min(p, m)
    for s in (g, f):
      assert s.ticks == 2 * (m + p - 1)
      assert ((s.op == schedules.FWD).sum(0) == m).all() and ((s.op == schedules.BWD).sum(0) == m).all()
      equal_cost = schedules.bubble_fraction(s, bwd_cost=np.ones(p))
      assert abs(equal_cost - schedules.analytic_bubble(p, m)) < 1e-12
  # Lock-step ticks: a slow stage stretches every tick, so non-uniform stages add bubble.
  s = schedules.build("1f1b", 4, 8)
  assert schedules.bubble_fraction(s, [1, 3, 3, 1]) > schedules.bubble_fraction(s, [2, 2, 2, 2])


BAD = [
    (dict(stage_layers=(3, 3)), "sums to 6 but model.num_layers=8"),
    (dict(stage_layers=(4, 2, 2)), "has 3 stages but mesh.pipe=2"),
    (dict(stage_layers=(0, 8)), "every stage needs a positive"),
    (dict(microbatches=3), "pipeline.microbatches=3 does not divide the 8 rows"),
    (dict(microbatches=0), "must be a positive integer"),
    (dict(schedule="interleaved"), "pipeline.schedule='interleaved' is unknown"),
]


@pytest.mark.parametrize("change,needle", BAD, ids=[n for _, n in BAD])
def test_bad_pipeline_config(change, needle):
  c = _config(data=2, tensor=2, pipe=2)
  c.pipeline.update(change)
  with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[")):
    config_check.check(c, 8)


def test_more_stages_than_blocks_and_dropout():
  c = _config(data=1, tensor=1, pipe=8)
  c.model.num_layers = 4
  with pytest.raises(ConfigError, match="mesh.pipe=8 stages but model.num_layers=4"):
    config_check.check(c, 8)
  c = _config(data=4, tensor=1, pipe=2, microbatches=2)
  c.model.dropout_rate = 0.1
  with pytest.raises(ConfigError, match="does not support dropout"):
    config_check.check(c, 8)
