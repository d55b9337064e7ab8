"""The planner's one search per mesh, as planner.plan and experiments.simulated use it."""

import dataclasses

import ml_collections

from experiments import points as points_lib
from experiments import simulated
from rec_llm.sim import cluster, planner, simulator as sim


def _points(**group) -> list[dict]:
  sweep = ml_collections.ConfigDict()
  sweep.name = "planner_test"
  sweep.defaults = dict(config="experiments/configs/large_1b.py", trace=False,
                        overrides=dict(data=dict(num_items=200_000)), clusters=("h100x8",))
  sweep.groups = [group]
  return points_lib.expand(sweep)


def test_planner_best_per_mesh_is_what_simulated_reports():
  # 48 rows per device: pure PP fits some shapes only with remat, and one of those is fastest
  # (the search tries remat per (schedule, microbatches) shape, not per mesh). (At 32 rows
  # stage-local blocks and weight-free residual buffers fit every shape without it.)
  for point in _points(name="pure", rows_per_device=(8, 48), meshes=("dp", "tp", "pp"),
                       compressions=("none", "any")):
    row = simulated.run(point)
    c, _, m, batch = simulated.setup(point)
    shape = points_lib.parse_mesh(point["mesh"], c.devices)
    results, stats = planner.plan(m, batch, c, top=10**9, options=simulated._options(point))
    on_mesh = [r for r in results if (r.plan.data, r.plan.tensor, r.plan.pipe) == shape]
    assert row["status"] == "ok" and on_mesh, (point, row.get("reason"))
    assert row["plan"] == dataclasses.asdict(on_mesh[0].plan), point
    assert row["tokens_per_s"] == on_mesh[0].tokens_per_s
    if point["mesh"] == "pp" and point["rows_per_device"] == 48:
      assert {r.plan.remat for r in on_mesh} == {False, True}
    best = simulated.run({**point, "mesh": "best"})
    assert best["tokens_per_s"] == results[0].tokens_per_s >= row["tokens_per_s"]
    assert best["planner"] == {k: stats[k] for k in ("considered", "feasible", "meshes")}


def test_search_mesh_adds_up_to_plan():
  c = cluster.preset("h100x128", devices=16)
  m, batch = simulated.setup(_points(name="p", meshes=("best",))[0])[2:]
  results, stats = planner.plan(m, batch, c, top=10**9)
  found = [planner.search_mesh(m, batch, c, s) for s in planner.meshes(m, batch, c)]
  assert sum(f.considered for f in found) == stats["considered"] > len(found)
  assert sorted(r.tokens_per_s for f in found for r in f.fitting) == sorted(
      r.tokens_per_s for r in results)
  assert max(f.best.tokens_per_s for f in found if f.best) == results[0].tokens_per_s


def test_dp_variants_pairs_and_overrides():
  c = cluster.preset("h100x128", devices=16)
  base = sim.Plan(data=16)  # two nodes of 8: a two-level data group
  opts = planner.Options(compressions=("none", "topk", "sign"))
  pairs = lambda **kw: [(p.compression, p.aggregator) for p in
                        planner.dp_variants(base, c, opts, **kw)]
  assert pairs() == [("none", "psum"), ("none", "hierarchical"), ("topk", "sparse")]
  assert pairs(pair_all=True)[-1] == ("sign", "psum")  # a kind DP_OPTIONS does not pair
  assert pairs(aggregator="ring") == [("none", "ring"), ("topk", "ring"), ("sign", "ring")]
  assert list(planner.dp_variants(sim.Plan(tensor=16), c, opts)) == [sim.Plan(tensor=16)]
  assert simulated.PLANNER_KINDS == ("none", "int8", "topk", "powersgd")
