"""The guarded update in every step variant: a step whose gradients, parameter update or new
optimizer state is not finite changes nothing (bit for bit) and counts as skipped.

Faults (rec_llm/train/faults.py) at three steps of one run per variant: NaN gradients at
step 1, a NaN update at step 2 (the loss and gradients are fine: the update is what breaks,
as with a huge learning rate), a NaN in the new optimizer state at step 3.
"""

import jax
import numpy as np
import pytest

from rec_llm.numerics import nonfinite_leaves
from rec_llm.train import trainer
from tests.helpers import tiny_config

VARIANTS = {
    "gspmd": dict(mesh=dict(data=4, tensor=2)),
    "pipeline": dict(mesh=dict(data=2, tensor=2, pipe=2), pipeline=dict(microbatches=2)),
    "dp_int8_ring": dict(mesh=dict(data=4, tensor=2),
                         dp=dict(aggregator="ring", compression=dict(kind="int8"))),
    "stale": dict(mesh=dict(data=4, tensor=2), dp=dict(mode="stale", staleness=1)),
    "local_sgd": dict(mesh=dict(data=4, tensor=2), dp=dict(mode="local_sgd", local_steps=2)),
}


def _config(variant):
  spec = VARIANTS[variant]
  c = tiny_config(**spec["mesh"])
  for section in ("pipeline", "dp"):
    for k, v in spec.get(section, {}).items():
      if isinstance(v, dict):
        c[section][k].update(v)
      else:
        c[section][k] = v
  c.train.inject_nonfinite.update(gradients=(1,), updates=(2,), opt_state=(3,))
  return c


def _host(state):
  return jax.device_get((state.params, state.opt_state, state.dp))


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nonfinite_steps_change_nothing(variant):
  run = trainer.build(_config(variant))
  step, state = run.compile(), run.state
  before, losses, skipped = [_host(state)], [], []
  for i in range(5):
    state, m = step(state, run.batches(i))
    before.append(_host(state))
    losses.append(float(m["loss"]))
    skipped.append(int(m["skipped"]))
  assert skipped == [0, 1, 2, 3, 3], skipped
  assert np.isnan(losses[1]) and np.isfinite([losses[i] for i in (0, 2, 3, 4)]).all()
  for i in (1, 2, 3):  # the faulty steps left everything as it was
    for a, b in zip(jax.tree.leaves(before[i + 1]), jax.tree.leaves(before[i])):
      np.testing.assert_array_equal(a, b, err_msg=f"{variant}: step {i} changed the state")
  assert not nonfinite_leaves(state)
  changed = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before[5]),
                                                       jax.tree.leaves(before[4]))]
  assert any(changed), f"{variant}: step 4 trained nothing"
  assert int(state.step) == 5
