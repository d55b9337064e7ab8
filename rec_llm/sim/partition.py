"""Blocks -> pipeline stages: the contiguous partition that minimises the slowest stage.

Stage s holding blocks [i, j) takes
    (sum(layer_costs[i:j]) + first_extra * [s == 0] + last_extra * [s == P-1]) / speeds[s]
(the first stage also runs the embedding, the last the head and loss; `speeds` are the
stages' relative device speeds on heterogeneous hardware). Every stage gets >= 1 block.

`solve` is an exact dynamic programme, O(P * L^2) with the inner minimum vectorised:
best[s][j] = min_i max(best[s-1][i], time(s, i, j)). With per-stage speeds and extras the
textbook alternative (binary search on the bound + a greedy fill) needs care at the
stage boundaries and only pays off for L in the tens of thousands; models have at most a
few hundred blocks, where the DP takes milliseconds and is exact by construction.
`brute_force` enumerates every partition (tests).
"""

import itertools

import numpy as np

from rec_llm.errors import ConfigError


def stage_times(partition, layer_costs, first_extra=0.0, last_extra=0.0, speeds=None) -> list[float]:
  costs = np.asarray(layer_costs, float)
  p = len(partition)
  v = np.ones(p) if speeds is None else np.asarray(speeds, float)
  bounds = np.concatenate([[0], np.cumsum(partition)])
  out = []
  for s in range(p):
    w = costs[bounds[s]:bounds[s + 1]].sum() + first_extra * (s == 0) + last_extra * (s == p - 1)
    out.append(float(w / v[s]))
  return out


def _check(layer_costs, stages, speeds):
  n = len(layer_costs)
  if not 1 <= stages <= n:
    raise ConfigError(f"cannot split {n} blocks into {stages} stages (each stage needs a block)")
  if speeds is not None and (len(speeds) != stages or min(speeds) <= 0):
    raise ConfigError(f"speeds={list(speeds)} must give one positive speed per stage ({stages})")


def solve(layer_costs, stages: int, first_extra: float = 0.0, last_extra: float = 0.0,
          speeds=None) -> tuple[tuple[int, ...], float]:
  """(blocks per stage, the slowest stage's time) minimising the slowest stage."""
  _check(layer_costs, stages, speeds)
  costs = np.asarray(layer_costs, float)
  n, p = len(costs), stages
  v = np.ones(p) if speeds is None else np.asarray(speeds, float)
  prefix = np.concatenate([[0.0], np.cumsum(costs)])
  extra = lambda s: first_extra * (s == 0) + last_extra * (s == p - 1)
  inf = np.inf
  best = np.full((p, n + 1), inf)
  arg = np.zeros((p, n + 1), int)
  best[0, 1:] = (prefix[1:] + extra(0)) / v[0]
  for s in range(1, p):
    for j in range(s + 1, n - (p - 1 - s) + 1):
      i = np.arange(s, j)  # stage s takes blocks [i, j); stages before it hold [0, i)
      cand = np.maximum(best[s - 1, i], (prefix[j] - prefix[i] + extra(s)) / v[s])
      k = int(np.argmin(cand))
      best[s, j], arg[s, j] = cand[k], i[k]
  sizes, j = [], n
  for s in range(p - 1, 0, -1):
    i = arg[s, j]
    sizes.append(j - i)
    j = i
  sizes.append(j)
  return tuple(int(x) for x in reversed(sizes)), float(best[p - 1, n])


def brute_force(layer_costs, stages: int, first_extra: float = 0.0, last_extra: float = 0.0,
                speeds=None) -> tuple[tuple[int, ...], float]:
  """Every contiguous partition; for tests (exponential)."""
  _check(layer_costs, stages, speeds)
  n = len(layer_costs)
  best = (None, np.inf)
  for cuts in itertools.combinations(range(1, n), stages - 1):
    bounds = (0,) + cuts + (n,)
    part = tuple(b - a for a, b in zip(bounds, bounds[1:]))
    t = max(stage_times(part, layer_costs, first_extra, last_extra, speeds))
    if t < best[1]:
      best = (part, t)
  return best
