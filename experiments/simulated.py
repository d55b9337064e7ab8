"""A simulated sweep point: its plan on a cluster preset, predicted by rec_llm.sim (no JAX).

Named pure meshes ('dp', 'tp', 'pp') and explicit 'DxTxP' meshes are searched here for one
mesh (schedules, microbatches, remat and the DP pairing as the planner does them); 'hybrid'
and 'best' are the planner's own ranking over every mesh it considers.
"""

import dataclasses

from rec_llm.errors import ConfigError
from rec_llm.sim import cluster as cluster_lib
from rec_llm.sim import cost_model as cm
from rec_llm.sim import planner
from rec_llm.sim import simulator as sim

from experiments import points as points_lib

PLANNER_KINDS = ("none", "int8", "topk", "powersgd")  # what planner.DP_OPTIONS pairs


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


def _kinds(point) -> tuple:
  return PLANNER_KINDS if point["compression"] == "any" else (point["compression"],)


def _options(point, schedules=None) -> planner.Options:
  return planner.Options(compressions=_kinds(point), dp_modes=(point["dp_mode"],),
                         schedules=tuple(schedules or planner.Options.schedules),
                         staleness=point["staleness"] or 1, local_steps=point["local_steps"] or 1)


def _dp_variants(base: sim.Plan, c, point, opts):
  """planner's (compression, aggregator) pairs, or the point's own aggregator."""
  if base.data == 1:
    yield base
    return
  _, level, per_node = sim.axis_groups(c, base)["data"]
  two_level = level == "inter" and per_node > 1
  pairs = [(k, a) for k, a in planner.DP_OPTIONS if k in opts.compressions
           and (a != "hierarchical" or two_level)]
  if point["aggregator"]:
    pairs = [(k, point["aggregator"]) for k in opts.compressions]
  pairs += [(k, "sparse" if k == "topk" else "psum") for k in opts.compressions
            if not any(k == p for p, _ in pairs)]  # kinds the planner does not pair
  for kind, agg in pairs:
    yield dataclasses.replace(base, compression=kind, aggregator=agg, dp_mode=opts.dp_modes[0],
                              staleness=opts.staleness, local_steps=opts.local_steps)


def search_mesh(m, batch, c, shape, point, config, explicit: bool):
  """(best fitting Result or None, smallest non-fitting Result or None) for one mesh."""
  d, t, p = shape
  opts = _options(point, [point["schedule"]] if point["schedule"] else None)
  if explicit:  # the run config's pipeline, as the trainer would run it
    pc = config.pipeline
    bases = [sim.Plan(data=d, tensor=t, pipe=p, schedule=point["schedule"] or pc.schedule,
                      microbatches=(point["microbatches"] or pc.microbatches) if p > 1 else 1,
                      stage_layers=tuple(pc.stage_layers),
                      remat=bool(config.model.remat or pc.remat))]
  else:
    rows = batch.global_batch // d if batch.global_batch % d == 0 else 0
    if p == 1:
      shapes = [("1f1b", 1)]
    else:
      micro = [point["microbatches"]] if point["microbatches"] else sorted(
          {f * p for f in opts.microbatch_factors if rows and rows % (f * p) == 0}) or [p]
      shapes = [(s, k) for s in opts.schedules for k in micro]
    bases = [sim.Plan(data=d, tensor=t, pipe=p, schedule=s, microbatches=k, remat=r)
             for r in (False, True) for s, k in shapes]
  sim.check_plan(m, batch, c, bases[0])  # ConfigError: the mesh cannot hold this model
  best, smallest = None, None
  for remat in (False, True):
    for base in [b for b in bases if b.remat == remat]:
      if not explicit:
        base = dataclasses.replace(base, stage_layers=planner.balanced_stages(m, batch, c, base))
      for plan in _dp_variants(base, c, point, opts):
        r = sim.simulate(m, batch, c, plan)
        if r.fits and (best is None or r.tokens_per_s > best.tokens_per_s):
          best = r
        if not r.fits and (smallest is None or r.memory["total"] < smallest.memory["total"]):
          smallest = r
    if best is not None:
      break  # remat only where nothing fits without it, as the planner does
  return best, smallest


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
    results, stats = planner.plan(m, batch, c, top=10**9, options=_options(point, (
        [point["schedule"]] if point["schedule"] else None)))
    if spec == "hybrid":
      axes = lambda p: sum(x > 1 for x in (p.data, p.tensor, p.pipe))
      results = [r for r in results if axes(r.plan) >= 2]
    out["planner"] = {k: stats[k] for k in ("considered", "feasible", "meshes")}
    if not results:
      what = "with two or more parallel axes " if spec == "hybrid" else ""
      return {**out, "status": "infeasible",
              "reason": f"the planner found no plan {what}that fits ({stats['feasible']} of "
                        f"{stats['considered']} plans fit in memory)"}
    best = results[0]
  else:
    shape = points_lib.parse_mesh(spec, c.devices)
    try:
      best, smallest = search_mesh(m, batch, c, shape, point, config,
                                   explicit=spec not in ("dp", "tp", "pp"))
    except ConfigError as e:
      return {**out, "mesh": "x".join(map(str, shape)), "status": "infeasible",
              "reason": f"inexpressible: {e}"}
    if best is None:
      return {**out, "mesh": "x".join(map(str, shape)), "status": "infeasible",
              "reason": _no_fit(c, smallest), "memory_gib": smallest.memory["total"] / 2**30}
  row = best.row()
  row["step_time_s"] = row.pop("step_s")
  out.update(status="ok", **row, aggregator=best.plan.aggregator, dp_mode=best.plan.dp_mode,
             memory_bytes=best.memory, plan=dataclasses.asdict(best.plan))
  return out


def chrome_trace(point: dict, plan: dict) -> dict:
  """The Chrome trace (Perfetto JSON) of a simulated point's chosen plan."""
  c, _, m, batch = setup(point)
  p = sim.Plan(**{**plan, "stage_layers": tuple(plan["stage_layers"])})
  return sim.chrome_trace(sim.simulate(m, batch, c, p, timeline=True))
