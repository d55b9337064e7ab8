"""Enumerate plans for a model on a cluster, prune by memory, rank by predicted throughput.

Searched:
- meshes data x tensor x pipe = devices, tensor dividing heads, mlp and the table rows and
  at most one node (Megatron's all-reduces block every op: across nodes they dominate),
  pipe <= blocks, data dividing the global batch;
- with pipe > 1: both schedules and microbatches in {1, 2, 4, 8} x pipe (those dividing the
  replica's rows), the blocks placed by `partition.solve` (measured block, embedding and head
  costs, stage speeds on heterogeneous clusters);
- with data > 1: the data-parallel reduction as (compression, aggregator) pairs;
- remat only where the plan does not fit without it.
Lossy compression and asynchronous modes change convergence, which throughput does not
show: restrict `compressions` / `dp_modes` to compare like with like.
"""

import dataclasses
import time

import numpy as np

from rec_llm.errors import ConfigError
from rec_llm.sim import balance
from rec_llm.sim import cost_model as cm
from rec_llm.sim import partition as partition_lib
from rec_llm.sim import simulator as sim
from rec_llm.sim.cluster import Cluster

# (compression, aggregator) pairs worth trying; 'hierarchical' only where a data group has
# several members on each of several nodes.
DP_OPTIONS = (("none", "psum"), ("none", "hierarchical"), ("int8", "psum"),
              ("int8", "hierarchical"), ("topk", "sparse"), ("powersgd", "psum"))


@dataclasses.dataclass(frozen=True)
class Options:
  compressions: tuple = ("none", "int8", "topk", "powersgd")
  dp_modes: tuple = ("sync",)
  schedules: tuple = ("gpipe", "1f1b")
  microbatch_factors: tuple = (1, 2, 4, 8)
  staleness: int = 1
  local_steps: int = 4


def _divisors(n: int) -> list[int]:
  return [k for k in range(1, n + 1) if n % k == 0]


def meshes(m: cm.ModelSpec, batch: sim.Batch, c: Cluster) -> list[tuple[int, int, int]]:
  out = []
  for t in _divisors(c.devices):
    if m.num_heads % t or m.mlp_dim % t or m.vocab_size % t or t > c.devices_per_node:
      continue
    for p in _divisors(c.devices // t):
      d = c.devices // (t * p)
      if p <= m.num_layers and batch.global_batch % d == 0:
        out.append((d, t, p))
  return out


def balanced_stages(m: cm.ModelSpec, batch: sim.Batch, c: Cluster, base: sim.Plan) -> tuple:
  """Blocks per stage minimising the slowest stage (forward + backward of one microbatch)."""
  if base.pipe == 1:
    return (m.num_layers,)
  costs = balance.layer_costs(m, batch, c, base)
  speeds = sim.replica_stage_speeds(c, base).min(axis=0)
  sizes, _ = partition_lib.solve(costs["layer_costs"], base.pipe, costs["first_extra"],
                                 costs["last_extra"], speeds=speeds)
  return sizes


def _dp_variants(base: sim.Plan, c: Cluster, opts: Options):
  if base.data == 1:
    yield base
    return
  _, level, per_node = sim.axis_groups(c, base)["data"]
  two_level = level == "inter" and per_node > 1  # else hierarchical is the flat ring
  for comp, agg in DP_OPTIONS:
    if comp not in opts.compressions or (agg == "hierarchical" and not two_level):
      continue
    for mode in opts.dp_modes:
      yield dataclasses.replace(base, compression=comp, aggregator=agg, dp_mode=mode,
                                staleness=opts.staleness, local_steps=opts.local_steps)


def plan(m: cm.ModelSpec, batch: sim.Batch, c: Cluster, top: int = 5,
         options: Options | None = None) -> tuple[list[sim.Result], dict]:
  """The `top` feasible plans, fastest first, and search statistics."""
  opts = options or Options()
  t0 = time.perf_counter()
  for comp in opts.compressions:
    if comp not in cm.COMPRESSIONS:
      raise ConfigError(f"unknown compression {comp!r}; choose from {list(cm.COMPRESSIONS)}")
  for mode in opts.dp_modes:
    if mode not in sim.DP_MODES:
      raise ConfigError(f"unknown DP mode {mode!r}; choose from {list(sim.DP_MODES)}")
  results, considered, infeasible, min_mem = [], 0, 0, np.inf
  for d, t, p in meshes(m, batch, c):
    rows = batch.global_batch // d
    if p == 1:
      shapes = [("1f1b", 1)]
    else:
      micro = sorted({f * p for f in opts.microbatch_factors if rows % (f * p) == 0})
      shapes = [(s, k) for s in opts.schedules for k in micro]
    for schedule, k in shapes:
      for remat in (False, True):
        base = sim.Plan(data=d, tensor=t, pipe=p, schedule=schedule, microbatches=k, remat=remat)
        base = dataclasses.replace(base, stage_layers=balanced_stages(m, batch, c, base))
        fits_any = False
        for variant in _dp_variants(base, c, opts):
          considered += 1
          r = sim.simulate(m, batch, c, variant)
          if r.fits:
            results.append(r)
            fits_any = True
          else:
            infeasible += 1
            min_mem = min(min_mem, r.memory["total"])
        if fits_any:
          break  # remat only where nothing fits without it
  results.sort(key=lambda r: -r.tokens_per_s)
  stats = {"considered": considered, "feasible": len(results), "infeasible": infeasible,
           "meshes": len(meshes(m, batch, c)), "min_infeasible_memory_bytes": float(min_mem),
           "seconds": time.perf_counter() - t0}
  return results[:top], stats

