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
from tests.helpers import LAYOUT_RTOL, step_losses, tiny_config

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


def _config(data, tensor, dropout):
  c = tiny_config(data=data, tensor=tensor)
  c.model.dropout_rate = dropout
  return c


def _assert_same(got, ref):
  losses, grads = got
  ref_losses, ref_grads = ref
  numerics.check_close("losses", losses, ref_losses, LAYOUT_RTOL * np.abs(ref_losses))
  numerics.check_tree_rel("gradient", grads, ref_grads, LAYOUT_RTOL)


@pytest.mark.parametrize("data,tensor", LAYOUTS)
def test_layout_matches_single_device(reference, data, tensor):
  _assert_same(_trace(_config(data, tensor, 0.0), jax.devices()), reference[0.0])


def test_dropout_is_layout_independent(reference):
  """Dropout masks come from a partitionable RNG, so sharding does not change them."""
  _assert_same(_trace(_config(4, 2, 0.1), jax.devices()), reference[0.1])
  assert not np.allclose(reference[0.1][0], reference[0.0][0])  # dropout did act
