"""Fit the simulator's in-step corrections to the timed steps of a few plans.

Microbenchmarks (measure.py) time each piece alone. Inside a real step some costs only
appear together, and on a host whose virtual devices share the cores they do not add up
as the pieces suggest: the components run at another speed inside the whole program
(compute_scale) and inside a pipeline's stage loops (pipe_compute_scale, relative to
that), devices at once gain less than the isolated concurrency test says
(host_speedup; only where the calibration has no all-devices-busy tables), every
tensor-parallel collective is a meeting point of the devices' threads, waiting longer the
more work came before it (tp_sync_s_per_byte of its payload), each pipeline tick has a
fixed cost (its loops, slot updates and permutes: tick_s), the pipeline's in-flight
residuals are memory traffic outside the cache (pipe_buffer_s_per_byte), two processes
may slow each other's compute (process_compute_scale), and each data-parallel collective
across processes is a meeting of the processes (inter_sync_s).
Each is one parameter of the Cluster (cluster.CORRECTIONS), fitted here by bounded least
squares on the relative error of a few *fit* plans, about one per parameter; the simulator
is then judged on other plans (benchmarks/sim_calibration.py), never on the fit plans.
"""

import itertools
from typing import Callable, Sequence

import numpy as np

# name: (the value that switches the effect off, the lowest allowed, step for the derivative)
PARAMS = {
    "compute_scale": (1.0, 0.25, 0.1),
    "pipe_compute_scale": (1.0, 0.25, 0.1),
    "host_speedup": (1.0, 0.5, 0.1),
    "tp_sync_s_per_byte": (0.0, 0.0, 1e-9),
    "tick_s": (0.0, 0.0, 1e-3),
    "pipe_buffer_s_per_byte": (0.0, 0.0, 1e-10),
    "process_compute_scale": (1.0, 1.0, 0.5),
    "inter_sync_s": (0.0, 0.0, 1e-3),
}


def fit(predict: Callable[[dict, int], float], measured: Sequence[float],
        names: Sequence[str] = tuple(PARAMS), iterations: int = 4) -> dict:
  """Corrections minimising the squared relative error of predict(corrections, i) against
  measured[i] over the fit plans, each at or above its lowest allowed value.

  The step time is nearly linear in each correction (products of two scales and a max()
  over pipeline stages aside), so the model is linearised and solved exactly, a few times
  around the latest solution (Gauss-Newton): every subset of parameters free, the others
  at their lowest values, the best feasible least-squares solution kept. A parameter that
  no fit plan exercises is left out (the Cluster keeps its default).
  """
  meas = np.asarray(measured, float)
  low = np.array([PARAMS[k][1] for k in names])
  center = np.array([PARAMS[k][0] for k in names])
  for _ in range(iterations):
    at = lambda v: dict(zip(names, map(float, v)))
    base = np.array([predict(at(center), i) for i in range(len(meas))])
    cols = []
    for j, k in enumerate(names):
      moved = center.copy()
      moved[j] += PARAMS[k][2]
      cols.append((np.array([predict(at(moved), i) for i in range(len(meas))]) - base)
                  / PARAMS[k][2])
    a = np.stack(cols, 1) / meas[:, None]     # relative sensitivities [plans, params]
    used = [j for j in range(len(names)) if np.abs(a[:, j]).max() > 1e-9]
    r_low = (base - meas) / meas + a @ (low - center)   # every parameter at its lowest
    best, best_x = None, None
    for size in range(len(used) + 1):
      for free in itertools.combinations(used, size):
        x = np.where(np.isin(np.arange(len(names)), used), 0.0, center - low)
        if free:
          x_free, *_ = np.linalg.lstsq(a[:, free], -(r_low + a @ x), rcond=None)
          if (x_free < 0).any():
            continue
          x[list(free)] = x_free
        err = float(np.sum((r_low + a @ x) ** 2))
        if best is None or err < best - 1e-15:
          best, best_x = err, x
    center = low + best_x
  final = np.array([predict(at(center), i) for i in range(len(meas))])
  out = {names[j]: float(center[j]) for j in used}
  out["fit_rms_rel_error"] = float(np.sqrt(np.mean(((final - meas) / meas) ** 2)))
  return out
