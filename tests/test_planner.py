"""The planner's one search per mesh, as planner.plan and experiments.simulated use it."""

import dataclasses

import ml_collections
import numpy as np
import pytest

from experiments import points as points_lib
from experiments import simulated
from rec_llm.sim import cluster, cost_model as cm, planner, simulator as sim


def _points(**group) -> list[dict]:
  sweep = ml_collections.ConfigDict()
  sweep.name = "planner_test"
  sweep.defaults = dict(config="experiments/configs/large_1b.py", trace=False,
                        overrides=dict(data=dict(num_items=200_000)), clusters=("h100x8",))
  sweep.groups = [group]
  return points_lib.expand(sweep)


def test_planner_best_per_mesh_is_what_simulated_reports():
  # 96 rows per device: pure PP fits some shapes only with remat, and one of those is fastest
  # (the search tries remat per (schedule, microbatches) shape, not per mesh). (At 64 rows
  # stage-local blocks, weight-free residual buffers and the chunked head's logits fit every
  # shape without it.)
  for point in _points(name="pure", rows_per_device=(8, 96), meshes=("dp", "tp", "pp"),
                       compressions=("none", "any")):
    row = simulated.run(point)
    c, _, m, batch = simulated.setup(point)
    shape = points_lib.parse_mesh(point["mesh"], c.devices)
    results, stats = planner.plan(m, batch, c, top=10**9, options=simulated._options(point))
    on_mesh = [r for r in results if (r.plan.data, r.plan.tensor, r.plan.pipe) == shape]
    assert row["status"] == "ok" and on_mesh, (point, row.get("reason"))
    assert row["plan"] == dataclasses.asdict(on_mesh[0].plan), point
    assert row["tokens_per_s"] == on_mesh[0].tokens_per_s
    if point["mesh"] == "pp" and point["rows_per_device"] == 96:
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


MIXED_MODEL = cm.ModelSpec(num_layers=8, d_model=2048, num_heads=16, mlp_dim=8192, max_len=200,
                           num_items=100_000, dtype="bfloat16")
EVEN = planner.Options(batch_shares=(False,))


def test_planner_picks_batch_shares_on_a_mixed_cluster():
  c, m, batch = cluster.preset("mixed_a100_h100"), MIXED_MODEL, sim.Batch(256, 200)
  results, stats = planner.plan(m, batch, c, top=10**9)
  even, even_stats = planner.plan(m, batch, c, top=10**9, options=EVEN)
  best, e = results[0], even[0]
  assert best.plan.batch_shares and not any(r.plan.batch_shares for r in even)
  assert best.row()["batch_shares"] and len(best.row()["shares"]) == best.plan.data
  # the equal-share plans are all still searched, unchanged, next to their shared twins
  assert stats["considered"] > even_stats["considered"]
  assert sorted(r.tokens_per_s for r in results if not r.plan.batch_shares) == sorted(
      r.tokens_per_s for r in even)
  # The best equal-share plan with shares: every replica finishes with the slowest one's
  # time x data x its share; the planner's pick is at least that fast.
  shared = sim.simulate(m, batch, c, dataclasses.replace(e.plan, batch_shares=True))
  assert shared.breakdown["pipeline"] == pytest.approx(
      e.breakdown["pipeline"] * e.plan.data * min(shared.shares), rel=1e-9)
  assert best.step_s <= shared.step_s < 0.9 * e.step_s
  # Pure DP: a replica's step is its compute at its device's roofline speed, so its share is
  # in proportion to that speed, and the pipeline shrinks to data x min(speed) / sum(speeds).
  dp = planner.search_mesh(m, batch, c, (32, 1, 1)).best
  dp_even = sim.simulate(m, batch, c, dataclasses.replace(dp.plan, batch_shares=False))
  speeds = np.asarray(c.effective_speeds(cm.compute_share(c, m, 1)))
  assert dp.plan.batch_shares and speeds.max() > 2 * speeds.min()
  np.testing.assert_allclose(dp.shares, speeds / speeds.sum(), rtol=0.01)
  assert dp.breakdown["pipeline"] == pytest.approx(
      dp_even.breakdown["pipeline"] * 32 * speeds.min() / speeds.sum(), rel=0.01)
  # the fastest replica holds the most rows: activations priced at its share
  assert dp.memory["activations"] == pytest.approx(
      dp_even.memory["activations"] * 32 * max(dp.shares), rel=1e-9)


def test_batch_shares_stage_partitions_and_homogeneous_clusters():
  # Nodes H100, A100, A100, A100: replica 0's stages sit on (H100, A100), replica 1's on two
  # A100s. Even shares balance each stage at its slowest replica's speed; with batch shares
  # the faster replica's own balance is worth more.
  mixed = cluster.preset("mixed_a100_h100")
  a, a_mem = mixed.speed[0], mixed.mem_speed[0]
  c = dataclasses.replace(mixed, speed=(1.0,) * 8 + (a,) * 24, mem_speed=(1.0,) * 8 + (a_mem,) * 24)
  m, batch = MIXED_MODEL, sim.Batch(256, 200)
  base = sim.Plan(data=2, tensor=8, pipe=2, microbatches=4)
  kinds = [dataclasses.replace(b, stage_layers=planner.balanced_stages(m, batch, c, b))
           for b in planner.share_variants(base, c, planner.Options(), m)]
  assert [b.batch_shares for b in kinds] == [False, True]
  assert kinds[0].stage_layers != kinds[1].stage_layers
  step = lambda p: sim.simulate(m, batch, c, p).breakdown["pipeline"]
  assert step(kinds[1]) < step(dataclasses.replace(kinds[0], batch_shares=True)) < step(kinds[0])
  # Homogeneous: never tried, the search is what it was with equal shares only.
  h = cluster.preset("h100x128", devices=16)
  assert planner.share_variants(sim.Plan(data=16), h, planner.Options(), m) == [sim.Plan(data=16)]
  results, stats = planner.plan(m, batch, h, top=10**9)
  even, even_stats = planner.plan(m, batch, h, top=10**9, options=EVEN)
  assert stats["considered"] == even_stats["considered"]
  assert [(r.plan, r.step_s) for r in results] == [(r.plan, r.step_s) for r in even]
  assert not any(r.plan.batch_shares for r in results)
