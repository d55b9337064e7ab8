"""A simulated sweep point: its plan on a cluster preset, predicted by rec_llm.sim (no JAX).

Named pure meshes ('dp', 'tp', 'pp') and explicit 'DxTxP' meshes are one mesh of the
planner's search (planner.search_mesh: a named mesh searched as the planner does, ZeRO stage
included, an explicit one with the run config's pipeline and dp.zero); 'hybrid' and 'best'
are the planner's own ranking over every mesh it considers. On a heterogeneous cluster the
pick may give the data replicas batch shares in proportion to their speed, which the engine
cannot run (it splits the batch evenly): such a row says so (`batch_shares`) and carries
the best equal-share plan beside it (`equal_shares`).
"""

import dataclasses

from rec_llm.errors import ConfigError
from rec_llm.sim import cluster as cluster_lib
from rec_llm.sim import cost_model as cm
from rec_llm.sim import planner
from rec_llm.sim import simulator as sim

from experiments import points as points_lib

PLANNER_KINDS = planner.PAIRED_KINDS  # what planner.DP_OPTIONS pairs


def setup(point: dict):
  """(cluster, run config, model spec, batch) of a point; ConfigError on bad input."""
  c = cluster_lib.preset(point["cluster"], point["devices"])
  config = points_lib.run_config(point, devices=c.devices)
  m = cm.ModelSpec.from_config(config)
  batch = sim.Batch(int(config.train.batch_size), int(config.model.max_len))
  if point["mesh"] in points_lib.PLANNED and point["compression"] not in PLANNER_KINDS + ("any",):
    raise ConfigError(f"compression {point['compression']!r} is not one the planner pairs "
                      f"({list(PLANNER_KINDS)}); use an explicit or pure mesh for it")
  return c, config, m, batch


def _options(point, named_mesh: bool = False) -> planner.Options:
  """The planner's options for a point; a named mesh also takes the point's microbatches."""
  return planner.Options(
      compressions=PLANNER_KINDS if point["compression"] == "any" else (point["compression"],),
      dp_modes=(point["dp_mode"],),
      schedules=(point["schedule"],) if point["schedule"] else planner.Options.schedules,
      microbatches=(point["microbatches"],) if named_mesh and point["microbatches"] else (),
      staleness=point["staleness"] or 1, local_steps=point["local_steps"] or 1)


def _explicit_plan(shape, point, config) -> sim.Plan:
  """The run config's pipeline and state sharding on an explicit mesh, as the trainer would
  run it."""
  d, t, p = shape
  pc = config.pipeline
  return sim.Plan(data=d, tensor=t, pipe=p, schedule=point["schedule"] or pc.schedule,
                  microbatches=(point["microbatches"] or pc.microbatches) if p > 1 else 1,
                  stage_layers=tuple(pc.stage_layers), remat=bool(config.model.remat or pc.remat),
                  zero=int(config.dp.zero), stage_local=bool(pc.stage_local))


def _search_mesh(m, batch, c, shape, point, config, explicit: bool) -> planner.MeshSearch:
  """planner.search_mesh for one mesh: a named one searched as the planner does, an explicit
  one with the config's pipeline; the point's aggregator and compression kinds either way."""
  bases = [_explicit_plan(shape, point, config)] if explicit else None
  opts = _options(point, named_mesh=not explicit)
  if explicit:  # the config's dp.zero, not a search over it
    opts = dataclasses.replace(opts, zero=(int(config.dp.zero),))
  return planner.search_mesh(m, batch, c, shape, opts, bases=bases,
                             aggregator=point["aggregator"], pair_all=True)


def _no_fit(c, smallest) -> str:
  need = smallest.memory["total"] / 2**30
  return (f"does not fit: the smallest plan ({smallest.plan.mesh}, remat={smallest.plan.remat}) "
          f"needs {need:.1f} GiB per device, {0.9 * c.memory_bytes / 2**30:.1f} GiB usable")


def run(point: dict) -> dict:
  """The row fields of a simulated point (status 'ok' or 'infeasible' with a reason)."""
  c, config, m, batch = setup(point)
  out = {"cluster": c.name, "cluster_info": c.to_dict(), "devices": c.devices,
         "model": m.to_dict(), "batch": dataclasses.asdict(batch), "config": config.to_dict()}
  spec = point["mesh"]
  if spec in points_lib.PLANNED:
    results, stats = planner.plan(m, batch, c, top=10**9, options=_options(point))
    if spec == "hybrid":
      axes = lambda p: sum(x > 1 for x in (p.data, p.tensor, p.pipe))
      results = [r for r in results if axes(r.plan) >= 2]
    out["planner"] = {k: stats[k] for k in ("considered", "feasible", "meshes")}
    if not results:
      what = "with two or more parallel axes " if spec == "hybrid" else ""
      return {**out, "status": "infeasible",
              "reason": f"the planner found no plan {what}that fits ({stats['feasible']} of "
                        f"{stats['considered']} plans fit in memory)"}
    best, fitting = results[0], results
  else:
    shape = points_lib.parse_mesh(spec, c.devices)
    try:
      found = _search_mesh(m, batch, c, shape, point, config, explicit=spec not in ("dp", "tp", "pp"))
    except ConfigError as e:
      return {**out, "mesh": "x".join(map(str, shape)), "status": "infeasible",
              "reason": f"inexpressible: {e}"}
    best, smallest, fitting = found.best, found.smallest, found.fitting
    if best is None:
      return {**out, "mesh": "x".join(map(str, shape)), "status": "infeasible",
              "reason": _no_fit(c, smallest), "memory_gib": smallest.memory["total"] / 2**30}
  row = best.row()
  row["step_time_s"] = row.pop("step_s")
  out.update(status="ok", **row, aggregator=best.plan.aggregator, dp_mode=best.plan.dp_mode,
             memory_bytes=best.memory, plan=dataclasses.asdict(best.plan))
  if best.plan.batch_shares:  # simulated only: the best plan the engine can run, beside it
    out["equal_shares"] = _equal_shares(fitting)
  return out


def _equal_shares(fitting: list) -> dict | None:
  """Row fields of the fastest of `fitting` with equal batch shares (None: none fits)."""
  even = max((r for r in fitting if not r.plan.batch_shares), key=lambda r: r.tokens_per_s,
             default=None)
  if even is None:
    return None
  return {"mesh": even.plan.mesh, "compression": even.plan.compression_label(),
          "zero": even.plan.zero, "step_time_s": even.step_s,
          "tokens_per_s": even.tokens_per_s, "mfu": even.mfu}


def chrome_trace(point: dict, plan: dict) -> dict:
  """The Chrome trace (Perfetto JSON) of a simulated point's chosen plan."""
  c, _, m, batch = setup(point)
  p = sim.Plan(**{**plan, "stage_layers": tuple(plan["stage_layers"])})
  return sim.chrome_trace(sim.simulate(m, batch, c, p, timeline=True))
