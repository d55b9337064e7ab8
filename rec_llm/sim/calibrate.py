"""Fit the simulator's in-step corrections to the timed steps of a few plans.

Microbenchmarks (measure.py) time each piece alone. Inside a real step some costs only
appear together: on a host whose virtual devices share the cores, every tensor-parallel
collective is a meeting point of all devices' threads, the pipeline moves its state
through conds every tick, and two processes slow each other's compute. Each has one
parameter in the Cluster (cluster.CORRECTIONS), fitted here by bounded least squares on the
relative error of a few *fit* plans; the simulator is then judged on other plans
(benchmarks/sim_calibration.py), never on the ones it was fitted to.
"""

import itertools
from typing import Callable, Sequence

import numpy as np

# name: (the value that switches the effect off, also its lower bound; step for the derivative)
PARAMS = {
    "tp_sync_s": (0.0, 1e-3),
    "bookkeeping_scale": (0.0, 1.0),
    "process_compute_scale": (1.0, 0.5),
}


def fit(predict: Callable[[dict, int], float], measured: Sequence[float],
        names: Sequence[str] = tuple(PARAMS)) -> dict:
  """Corrections minimising the squared relative error of predict(corrections, i) against
  measured[i] over the fit plans, each at or above its bound.

  The step time is linear in each correction (up to a max() over pipeline stages), so the
  model is linearised at the 'off' values and solved exactly: every subset of parameters
  free, the others at their bounds, the best feasible least-squares solution kept. A
  parameter that no fit plan exercises is left out (the Cluster keeps its default).
  """
  meas = np.asarray(measured, float)
  off = {k: PARAMS[k][0] for k in names}
  base = np.array([predict(off, i) for i in range(len(meas))])
  cols = []
  for k in names:
    step = PARAMS[k][1]
    moved = np.array([predict({**off, k: off[k] + step}, i) for i in range(len(meas))])
    cols.append((moved - base) / step)
  a = np.stack(cols, 1) / meas[:, None]       # relative sensitivities [plans, params]
  r0 = (base - meas) / meas                   # relative error with every effect off
  used = [j for j in range(len(names)) if np.abs(a[:, j]).max() > 1e-9]
  best, best_x = np.sum(r0 ** 2), np.zeros(len(names))
  for size in range(1, len(used) + 1):
    for free in itertools.combinations(used, size):
      x_free, *_ = np.linalg.lstsq(a[:, free], -r0, rcond=None)
      if (x_free < 0).any():   # every bound is the 'off' value: x >= 0 from it
        continue
      x = np.zeros(len(names))
      x[list(free)] = x_free
      err = np.sum((r0 + a @ x) ** 2)
      if err < best - 1e-15:
        best, best_x = err, x
  out = {names[j]: float(off[names[j]] + best_x[j]) for j in used}
  out["fit_rms_rel_error"] = float(np.sqrt(best / len(meas)))
  return out
