"""Enumerate plans for a model on a cluster, prune by memory, rank by predicted throughput.

Searched:
- meshes data x tensor x pipe = devices, tensor dividing heads, mlp and the table rows and
  at most one node (Megatron's all-reduces block every op: across nodes they dominate),
  pipe <= blocks, data dividing the global batch;
- with pipe > 1: both schedules and microbatches in {1, 2, 4, 8} x pipe (those dividing the
  replica's rows), the blocks placed by `partition.solve` (measured block, embedding and head
  costs, stage speeds on heterogeneous clusters);
- with data > 1: the data-parallel reduction as (compression, aggregator) pairs, and the
  state sharded over data (dp.zero 0, 1, 3: `zero_runs`);
- remat only where the plan (mesh, schedule, microbatches) does not fit without it;
- where the data replicas differ in speed (heterogeneous clusters): each plan also with batch
  shares in proportion to replica speed and stages balanced for them (`share_variants`,
  `balanced_stages`). Simulated only: the engine splits the batch evenly, so such a plan
  is a prediction of what shares would give, not one rec_llm can run.
`search_mesh` does all of that for one mesh; `plan` runs it on every mesh and ranks, and
experiments/simulated.py runs it on the named and explicit meshes of a sweep.
Lossy compression and asynchronous modes change convergence, which throughput does not
show: restrict `compressions` / `dp_modes` to compare like with like.
"""

import dataclasses
import functools
import time

import numpy as np

from rec_llm.errors import ConfigError
from rec_llm.parallel import payload
from rec_llm.parallel import schedules as schedules_lib
from rec_llm.sim import balance
from rec_llm.sim import cost_model as cm
from rec_llm.sim import partition as partition_lib
from rec_llm.sim import simulator as sim
from rec_llm.sim.cluster import Cluster

# (compression, aggregator) pairs worth trying; 'hierarchical' only where a data group has
# several members on each of several nodes.
DP_OPTIONS = (("none", "psum"), ("none", "hierarchical"), ("int8", "psum"),
              ("int8", "hierarchical"), ("topk", "sparse"), ("powersgd", "psum"))
PAIRED_KINDS = tuple(dict.fromkeys(kind for kind, _ in DP_OPTIONS))  # the kinds DP_OPTIONS pairs


@dataclasses.dataclass(frozen=True)
class Options:
  compressions: tuple = PAIRED_KINDS
  dp_modes: tuple = ("sync",)
  schedules: tuple = schedules_lib.SCHEDULES
  microbatch_factors: tuple = (1, 2, 4, 8)
  microbatches: tuple = ()  # pipe > 1: these counts instead of microbatch_factors x pipe
  staleness: int = 1
  local_steps: int = 4
  zero: tuple = (0, 1, 3)   # dp.zero stages tried where the trainer runs them (zero_runs)
  batch_shares: tuple = (False, True)  # tried where replicas differ in speed (share_variants)


@dataclasses.dataclass
class MeshSearch:
  """The plans simulated on one mesh: those that fit, in the order tried, and the smallest
  that does not (what it would take to fit)."""
  fitting: list = dataclasses.field(default_factory=list)
  considered: int = 0
  smallest: sim.Result | None = None

  @property
  def best(self) -> sim.Result | None:
    """The fastest fitting plan; the first tried among equals."""
    return max(self.fitting, key=lambda r: r.tokens_per_s, default=None)


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
  """Blocks per stage minimising the slowest stage (forward + backward of one microbatch),
  each stage at its devices' speed. One partition serves every data replica (SPMD): with
  even shares the step waits for the slowest replica, so each stage is taken at its slowest
  replica's speed; with batch shares all replicas finish together, at data / sum(1 / t_r),
  so of the partitions balanced for each replica's speeds and for the slowest ones, the one
  with the largest sum(1 / t_r) (t_r: replica r's slowest stage)."""
  if base.pipe == 1:
    return (m.num_layers,)
  costs = balance.layer_costs(m, batch, c, base)
  layer, first, last = costs["layer_costs"], costs["first_extra"], costs["last_extra"]
  speeds = sim.replica_stage_speeds(c, base, dataclasses.replace(m, max_len=batch.seq_len))
  solve = lambda s: partition_lib.solve(layer, base.pipe, first, last, speeds=s)[0]
  sizes = solve(speeds.min(axis=0))
  kinds, counts = np.unique(speeds, axis=0, return_counts=True)
  if not base.batch_shares or len(kinds) == 1:
    return sizes
  rate = lambda part: sum(n / max(partition_lib.stage_times(part, layer, first, last, s))
                          for s, n in zip(kinds, counts))
  return max([sizes] + [solve(s) for s in kinds], key=rate)  # ties: the slowest speeds' one


def share_variants(base: sim.Plan, c: Cluster, opts: Options, m: cm.ModelSpec) -> list:
  """`base` with each of `opts.batch_shares` where its data replicas differ in speed; else
  `base` alone (even shares: batch shares would change nothing, so homogeneous clusters
  search exactly the plans they did before). Batch shares are simulated only."""
  if base.data == 1 or len(np.unique(sim.replica_stage_speeds(c, base, m), axis=0)) == 1:
    return [base]
  return [dataclasses.replace(base, batch_shares=bool(s)) for s in opts.batch_shares]


def pipeline_shapes(shape: tuple, batch: sim.Batch, opts: Options) -> list[tuple[str, int]]:
  """(schedule, microbatches) pairs to try on a data x tensor x pipe mesh: one microbatch
  without a pipeline, else `opts.microbatches` or the factors x pipe dividing a replica's rows."""
  d, _, p = shape
  if p == 1:
    return [("1f1b", 1)]
  rows = batch.global_batch // d if batch.global_batch % d == 0 else 0
  micro = list(opts.microbatches) or sorted(
      {f * p for f in opts.microbatch_factors if rows and rows % (f * p) == 0})
  return [(s, k) for s in opts.schedules for k in micro]


def dp_variants(base: sim.Plan, c: Cluster, opts: Options, aggregator: str | None = None,
                pair_all: bool = False):
  """`base` with each data-parallel reduction tried: DP_OPTIONS' pairs of the kinds in
  `opts.compressions` ('hierarchical' only on two levels), or every kind with `aggregator`;
  `pair_all`: a kind DP_OPTIONS does not pair gets its default aggregator, else is skipped."""
  if base.data == 1:
    yield base
    return
  _, level, per_node = sim.axis_groups(c, base)["data"]
  two_level = level == "inter" and per_node > 1  # else hierarchical is the flat ring
  if aggregator:
    pairs = [(kind, aggregator) for kind in opts.compressions]
  else:
    pairs = [(kind, agg) for kind, agg in DP_OPTIONS
             if kind in opts.compressions and (agg != "hierarchical" or two_level)]
  if pair_all:
    paired = {kind for kind, _ in pairs}
    pairs += [(kind, "sparse" if kind == "topk" else "psum") for kind in opts.compressions
              if kind not in paired]
  for kind, agg in pairs:
    for mode in opts.dp_modes:
      yield dataclasses.replace(base, compression=kind, aggregator=agg, dp_mode=mode,
                                staleness=opts.staleness, local_steps=opts.local_steps)


def zero_runs(m: cm.ModelSpec, plan: sim.Plan) -> bool:
  """Whether the trainer runs `plan`'s dp.zero (config_check.check_zero's rules): 0 always;
  1 and 3 with data > 1 dividing d_model; 3 with GSPMD's step and no pipeline."""
  if plan.zero == 0:
    return True
  if plan.data == 1 or m.d_model % plan.data:
    return False
  return plan.zero == 1 or (plan.pipe == 1 and not sim.uses_dp_step(plan))


def search_mesh(m: cm.ModelSpec, batch: sim.Batch, c: Cluster, shape: tuple,
                options: Options | None = None, *, bases: list | None = None,
                aggregator: str | None = None, pair_all: bool = False) -> MeshSearch:
  """Simulates the plans of one data x tensor x pipe mesh (`dp_variants` of each base).

  bases: explicit pipeline settings (Plans on this mesh, simulated as given); None: every
  `pipeline_shapes` pair with balanced stages, remat only where it does not fit without.
  Raises ConfigError when the mesh cannot run the model (check_plan on the first base).
  """
  opts = options or Options()
  if bases is None:
    d, t, p = shape  # no count divides the rows: try pipe microbatches, check_plan says why
    shapes = pipeline_shapes(shape, batch, opts) or [(s, p) for s in opts.schedules]
    groups = [[sim.Plan(data=d, tensor=t, pipe=p, schedule=s, microbatches=k, remat=remat)
               for remat in (False, True)] for s, k in shapes]
  else:
    groups = [[b] for b in bases]
  sim.check_plan(m, batch, c, groups[0][0])
  found = MeshSearch()
  mr = dataclasses.replace(m, max_len=batch.seq_len)
  for group in groups:
    for base in group:
      tried = [base]  # explicit bases as given (even shares, as the trainer runs them)
      if bases is None:
        tried = [dataclasses.replace(b, stage_layers=balanced_stages(m, batch, c, b))
                 for b in share_variants(base, c, opts, mr)]
      if _simulate_variants(found, m, batch, c, tried, opts, aggregator, pair_all):
        break  # remat only where this shape fits nowhere without it
  return found


def _simulate_variants(found: MeshSearch, m: cm.ModelSpec, batch: sim.Batch, c: Cluster,
                       bases: list, opts: Options, aggregator: str | None,
                       pair_all: bool) -> bool:
  """Simulates each of `bases` with every `dp_variants` x dp.zero the trainer runs into
  `found`; whether any fits."""
  fits_any = False
  for base in bases:
    variants = (dataclasses.replace(v, zero=z) for v in dp_variants(
        base, c, opts, aggregator, pair_all) for z in opts.zero)
    for variant in filter(functools.partial(zero_runs, m), variants):
      r = sim.simulate(m, batch, c, variant)
      found.considered += 1
      fits_any |= r.fits
      if r.fits:
        found.fitting.append(r)
      elif found.smallest is None or r.memory["total"] < found.smallest.memory["total"]:
        found.smallest = r
  return fits_any


def _check_options(opts: Options):
  """ConfigError on a compression or DP mode the simulator does not know."""
  for comp in opts.compressions:
    if comp not in payload.KINDS:
      raise ConfigError(f"unknown compression {comp!r}; choose from {list(payload.KINDS)}")
  for mode in opts.dp_modes:
    if mode not in payload.DP_MODES:
      raise ConfigError(f"unknown DP mode {mode!r}; choose from {list(payload.DP_MODES)}")


def plan(m: cm.ModelSpec, batch: sim.Batch, c: Cluster, top: int = 5,
         options: Options | None = None) -> tuple[list[sim.Result], dict]:
  """The `top` feasible plans, fastest first, and search statistics."""
  opts = options or Options()
  t0 = time.perf_counter()
  _check_options(opts)
  results, considered, min_mem = [], 0, np.inf
  for shape in meshes(m, batch, c):
    if not pipeline_shapes(shape, batch, opts):
      continue  # no microbatch count divides a replica's rows
    found = search_mesh(m, batch, c, shape, opts)
    results += found.fitting
    considered += found.considered
    if found.smallest is not None:
      min_mem = min(min_mem, found.smallest.memory["total"])
  results.sort(key=lambda r: -r.tokens_per_s)
  stats = {"considered": considered, "feasible": len(results),
           "infeasible": considered - len(results), "meshes": len(meshes(m, batch, c)),
           "min_infeasible_memory_bytes": float(min_mem), "seconds": time.perf_counter() - t0}
  return results[:top], stats
