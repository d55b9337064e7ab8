"""Every data x tensor layout of 8 devices computes the same numbers as one device.

Tolerance (tests/numerics.py, `LAYOUT_RTOL`): only the order of float32 reductions differs
between layouts, so losses (relative) and every gradient (relative norm, per parameter) agree
within the probabilistic reordering bound.
"""

import jax
import numpy as np
import pytest

from rec_llm.parallel import sharding
from rec_llm.train import trainer
from rec_llm.train.step import loss_fn
from tests import numerics
from tests.helpers import LAYOUT_RTOL, conditioned_rtol, step_losses, tiny_config

LAYOUTS = [(8, 1), (4, 2), (2, 4), (1, 8)]
STEPS = 3


def _grads(run, batch):
  def g(params, batch):
    return jax.grad(lambda p: loss_fn(p, batch, run.model, run.model_cfg.num_items + 1)[0])(params)
  with sharding.activate(run.mesh):
    return jax.device_get(jax.jit(g)(run.state.params, batch))


def _trace(config, devices):
  run = trainer.build(config, devices)
  grads = _grads(run, run.batches(0))
  return step_losses(run, STEPS)[0], grads


@pytest.fixture(scope="module")
def reference():
  return {dropout: _trace(_config(1, 1, dropout), jax.devices()[:1]) for dropout in (0.0, 0.1)}


@pytest.fixture(scope="module")
def hstu_reference():
  """(losses, gradients) on one device, and the gradients' tolerance from their sensitivity
  to an ulp in every parameter (helpers.conditioned_rtol)."""
  run = trainer.build(_config(1, 1, 0.1, "hstu"), jax.devices()[:1])
  grads = _grads(run, run.batches(0))
  params = run.state.params
  run.state = run.state.replace(params=jax.device_put(numerics.ulp_perturbed(params)))
  rtol = conditioned_rtol(numerics.max_tree_rel(_grads(run, run.batches(0)), grads))
  run.state = run.state.replace(params=params)
  return (step_losses(run, STEPS)[0], grads), rtol


def _config(data, tensor, dropout, block="transformer"):
  c = tiny_config(data=data, tensor=tensor)
  c.model.update(dropout_rate=dropout, block=block)
  return c


def _assert_same(got, ref, grad_rtol=LAYOUT_RTOL):
  losses, grads = got
  ref_losses, ref_grads = ref
  numerics.check_close("losses", losses, ref_losses, LAYOUT_RTOL * np.abs(ref_losses))
  numerics.check_tree_rel("gradient", grads, ref_grads, grad_rtol)


@pytest.mark.parametrize("data,tensor", LAYOUTS)
def test_layout_matches_single_device(reference, data, tensor):
  _assert_same(_trace(_config(data, tensor, 0.0), jax.devices()), reference[0.0])


def test_dropout_is_layout_independent(reference):
  """Dropout masks come from a partitionable RNG, so sharding does not change them."""
  _assert_same(_trace(_config(4, 2, 0.1), jax.devices()), reference[0.1])
  assert not np.allclose(reference[0.1][0], reference[0.0][0])  # dropout did act


@pytest.mark.parametrize("data,tensor", [(4, 2), (1, 8)])
def test_hstu_layout_matches_single_device(hstu_reference, data, tensor):
  """The HSTU block (heads, gate and relative bias split over tensor), with dropout."""
  ref, rtol = hstu_reference
  _assert_same(_trace(_config(data, tensor, 0.1, "hstu"), jax.devices()), ref, rtol)
