"""The cost model, simulator, partition solver, planner, balancer and plan CLI."""

import dataclasses
import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest

from rec_llm.errors import ConfigError
from rec_llm.models import arithmetic
from rec_llm.parallel import payload, schedules, vocab_parallel
from rec_llm.sim import balance, cluster, cost_model as cm, partition, planner, simulator as sim
from tests.conftest import ROOT

DEFAULT = cm.ModelSpec(num_layers=4, d_model=128, num_heads=4, mlp_dim=512, max_len=64, num_items=4096)
LARGE = cm.ModelSpec(num_layers=24, d_model=2048, num_heads=16, mlp_dim=8192, max_len=200,
                     num_items=2_000_000, dtype="bfloat16")


def test_model_arithmetic_by_hand():
  """rec_llm/models/arithmetic.py (the model's and the simulator's, from the leaf shapes that
  tests/test_model.py checks against the init) against its formulas written out."""
  d, f, L, V = 128, 512, 4, DEFAULT.vocab_size
  per_block = 4 * d * d + 2 * d + d + 2 * d * f + f + d + 4 * d  # q, v, out biases; 2 norms
  assert arithmetic.count_params(DEFAULT) == {"embedding": V * d + 64 * d,
                                              "blocks": L * per_block + 2 * d}
  assert arithmetic.block_params(DEFAULT, 2) == (4 * d * d + 2 * d + 2 * d * f + f) / 2 + 6 * d
  assert arithmetic.shared_params(DEFAULT, 2) == V * d / 2 + 64 * d + 2 * d
  flops = 6.0 * L * (4 * d * d + 2 * d * f) + 6.0 * d * (4096 + 1) + 12.0 * L * 64 * d
  assert arithmetic.flops_per_token(DEFAULT, 64) == flops


def test_hstu_block_arithmetic_and_costs():
  """The HSTU block's parameters and FLOPs written out (u, v, q, k and out; one norm; a
  [heads, max_len] relative bias; no MLP), and the simulator pricing it below a transformer
  block of the same width: fewer matmuls and, under a tensor split, 2 all-reduces (5 [n, d]
  payloads) for its 4 (6) (cost_model.BLOCK_SHAPES, checked against the HLO in tests/test_model.py)."""
  hstu = dataclasses.replace(DEFAULT, block="hstu")
  d, L, H, S, V = 128, 4, 4, 64, DEFAULT.vocab_size
  per_block = 5 * d * d + 4 * d + d + 2 * d + H * S
  assert arithmetic.count_params(hstu) == {"embedding": V * d + S * d, "blocks": L * per_block + 2 * d}
  assert arithmetic.block_params(hstu, 2) == (5 * d * d + 4 * d + H * S) / 2 + 3 * d
  assert arithmetic.flops_per_token(hstu, S) == 6.0 * L * 5 * d * d + 6.0 * d * 4097 + 12.0 * L * S * d
  c, batch, plan = cluster.preset("h100x8"), sim.Batch(64, 64), sim.Plan(data=4, tensor=2)
  ours, theirs = (sim.simulate(m, batch, c, plan).breakdown for m in (hstu, DEFAULT))
  assert ours["compute"] < theirs["compute"]
  assert 0 < ours["tensor_comm"] < theirs["tensor_comm"]
  assert cm.ModelSpec(**{k: v for k, v in hstu.to_dict().items() if k != "vocab_size"}) == hstu


def test_partition_solver_equals_brute_force():
  rng = np.random.default_rng(0)
  for _ in range(120):
    layers = int(rng.integers(1, 10))
    stages = int(rng.integers(1, min(layers, 5) + 1))
    costs = rng.uniform(0.1, 3.0, layers)
    first, last = rng.uniform(0, 2, 2)
    speeds = rng.uniform(0.3, 1.0, stages) if rng.random() < 0.6 else None
    got, t = partition.solve(costs, stages, first, last, speeds)
    _, want = partition.brute_force(costs, stages, first, last, speeds)
    assert len(got) == stages and sum(got) == layers and min(got) >= 1
    assert math.isclose(t, want, rel_tol=1e-12)
    assert math.isclose(max(partition.stage_times(got, costs, first, last, speeds)), want, rel_tol=1e-12)
  # a slow stage gets fewer blocks; the head's stage too
  assert partition.solve([1.0] * 8, 2, speeds=[1.0, 1 / 3])[0] == (6, 2)
  assert partition.solve([1.0] * 8, 4, last_extra=2.0)[0][-1] < 2


def test_planner_1024_devices_under_5s_and_all_fit():
  c = cluster.preset("h100x128", devices=1024)
  assert c.devices == 1024 and c.nodes == 128
  t = time.perf_counter()
  results, stats = planner.plan(LARGE, sim.Batch(1024, 200), c, top=10)
  elapsed = time.perf_counter() - t
  assert elapsed < 5.0, elapsed
  assert results and stats["considered"] > 100
  for r in results:
    p = r.plan
    assert p.data * p.tensor * p.pipe == 1024 and r.fits
    assert r.memory["total"] <= c.memory_bytes
    assert 0 < r.mfu < 1
  steps = [r.tokens_per_s for r in results]
  assert steps == sorted(steps, reverse=True)


def test_more_data_parallelism_moves_more_dp_bytes():
  c = cluster.preset("h100x8")
  batch = sim.Batch(64, 64)
  runs = [sim.simulate(DEFAULT, batch, c, sim.Plan(data=d, tensor=8 // d)) for d in (2, 4, 8)]
  dp_bytes = [r.dp_bytes for r in runs]
  dp_time = [r.breakdown["dp_comm"] for r in runs]
  assert dp_bytes == sorted(dp_bytes) and len(set(dp_bytes)) == 3
  assert dp_time == sorted(dp_time) and len(set(dp_time)) == 3
  assert sim.simulate(DEFAULT, batch, cluster.preset("h100x8", devices=1), sim.Plan()).dp_bytes == 0


def test_1f1b_needs_less_memory_than_gpipe():
  c = cluster.preset("h100x8")
  for pipe, micro in ((2, 4), (4, 8), (4, 16)):
    mem = {s: sim.simulate(DEFAULT, sim.Batch(64, 64), c,
                           sim.Plan(data=8 // pipe, pipe=pipe, schedule=s, microbatches=micro)).memory
           for s in ("gpipe", "1f1b")}
    assert mem["1f1b"]["activations"] < mem["gpipe"]["activations"]
    assert mem["1f1b"]["total"] < mem["gpipe"]["total"]


def test_bubble_matches_schedules():
  c = cluster.preset("h100x8")
  batch = sim.Batch(64, 64)
  for kind, pipe, micro in (("gpipe", 4, 8), ("1f1b", 4, 8), ("gpipe", 2, 4), ("1f1b", 8, 8)):
    plan = sim.Plan(data=8 // pipe, pipe=pipe, schedule=kind, microbatches=micro,
                    stage_layers=(1,) * pipe if pipe > 4 else ())
    m = DEFAULT if pipe <= 4 else cm.ModelSpec(**{**DEFAULT.__dict__, "num_layers": 8})
    r = sim.simulate(m, batch, c, plan)
    sizes = schedules.stage_sizes(m.num_layers, pipe, plan.stage_layers)
    costs = sim.stage_costs(m, batch, c, plan, sizes)
    sched = schedules.build(kind, pipe, micro)
    assert r.bubble == pytest.approx(schedules.bubble_fraction(sched, costs.fwd, costs.bwd))
    # the simulated lock-step time is the schedule's elapsed time (plus links and slots)
    ideal = sim.pipeline_seconds(costs.fwd, costs.bwd, kind, micro)
    busy = micro * (costs.fwd + costs.bwd).sum()
    assert 1 - busy / (pipe * ideal) == pytest.approx(r.bubble)
    extra = sched.ticks * (costs.p2p + costs.tick_extra) + sched.ticks * max(costs.tp_fwd.max(), costs.tp_bwd.max())
    assert ideal <= r.breakdown["pipeline"] <= ideal + extra + 1e-12
  # uniform stages, GPipe: (M+P-1) ticks of each kind, the textbook bubble (P-1)/(M+P-1)
  elapsed = sim.pipeline_seconds([1.0] * 4, [2.0] * 4, "gpipe", 8)
  assert elapsed == (8 + 3) * 3.0
  assert 1 - 8 * 3.0 * 4 / (4 * elapsed) == pytest.approx(schedules.analytic_bubble(4, 8))


def test_compression_lowers_dp_time():
  c = cluster.preset("h100x128")
  batch = sim.Batch(1024, 200)
  base = sim.Plan(data=16, tensor=8, pipe=1)
  none = sim.simulate(LARGE, batch, c, base)
  # Both steps reduce the gradient tree once (GSPMD's sums the item table's lookup and head
  # gradients first), and quantised payloads travel encoded only through the ring (as
  # rec_llm/parallel/compression.py): int8 over psum is the dense float32 mean.
  shapes = list(arithmetic.param_shapes(LARGE, 8).values())
  assert none.dp_bytes == payload.dense_bytes(shapes, 16)
  dense_int8 = sim.simulate(LARGE, batch, c, sim.Plan(data=16, tensor=8, compression="int8"))
  assert dense_int8.dp_bytes == payload.dense_bytes(shapes, 16)
  for comp, agg in (("int8", "ring"), ("topk", "sparse"), ("powersgd", "psum"), ("sign", "ring"),
                    ("qsgd", "ring"), ("randomk", "ring"), ("randomk", "psum")):
    r = sim.simulate(LARGE, batch, c, sim.Plan(data=16, tensor=8, compression=comp, aggregator=agg))
    assert r.breakdown["dp_comm"] < none.breakdown["dp_comm"], comp
    assert r.dp_bytes < none.dp_bytes and r.breakdown["compression"] > 0
    assert r.dp_bytes == payload.payload_bytes(comp, shapes, replicas=16, aggregator=agg)
  with pytest.raises(ConfigError, match="does not fit compression kind 'topk'"):
    sim.simulate(LARGE, batch, c, sim.Plan(data=16, tensor=8, compression="topk", aggregator="ring"))
  # 8 data replicas per node: hierarchical (NVLink inside, InfiniBand across) beats a flat ring
  m = cm.ModelSpec(**{**LARGE.__dict__, "num_layers": 2, "num_items": 10_000})
  flat = sim.simulate(m, sim.Batch(1024, 200), c, sim.Plan(data=128))
  hier = sim.simulate(m, sim.Batch(1024, 200), c, sim.Plan(data=128, aggregator="hierarchical"))
  assert hier.breakdown["dp_comm"] < flat.breakdown["dp_comm"] / 4
  # payload formulas, by hand, on 4 replicas: leaves of 100,000 and 100 entries
  leaves = [(1000, 100), (100,)]
  wire = lambda kind, agg, **kw: payload.payload_bytes(kind, leaves, replicas=4, aggregator=agg, **kw)
  assert wire("none", "psum") == 2 * 3 / 4 * 4 * 100_100
  # ring chunk ceil(100,100 / 4) = 25,025 entries, rounded up to the codec's chunk; 6 hops
  assert wire("int8", "ring") == wire("qsgd", "ring") == 6 * (25_088 + 4 * 98)
  assert wire("int8", "hierarchical", group=2) == wire("int8", "ring")
  assert wire("sign", "ring") == 6 * (25_600 // 8 + 4 * 25)
  assert wire("int8", "psum") == wire("none", "psum")  # decoded, then the float32 psum
  # top-k per leaf in blocks of 65,536: 2 blocks x ceil(655.36) + 1 pairs of 4 bytes
  assert wire("topk", "sparse", ratio=0.01) == 3 * (2 * 656 + 1) * 4
  assert wire("randomk", "ring", ratio=0.01) == 6 * 4 * math.ceil(1001 / 4)
  # PowerSGD: P [1000, 4] with the dense vector, then Q [100, 4]
  assert wire("powersgd", "psum", rank=4) == 2 * 3 / 4 * 4 * (4000 + 100 + 400)
  # asynchrony: stale hides the reduction behind compute, local SGD divides it by H
  stale = sim.simulate(LARGE, batch, c, sim.Plan(data=16, tensor=8, dp_mode="stale"))
  local = sim.simulate(LARGE, batch, c, sim.Plan(data=16, tensor=8, dp_mode="local_sgd", local_steps=4))
  assert stale.breakdown["dp_exposed"] <= none.breakdown["dp_exposed"]
  assert local.breakdown["dp_exposed"] == pytest.approx(local.breakdown["dp_comm"] / 4)
  assert local.dp_bytes == stale.dp_bytes / 4 == dense_int8.dp_bytes / 4  # the tree, once
  assert stale.breakdown["straggler_s"] < none.breakdown["straggler_s"]


def test_heterogeneous_cluster_and_balance():
  c = cluster.preset("mixed_a100_h100")
  batch = sim.Batch(256, 200)
  m = cm.ModelSpec(**{**LARGE.__dict__, "num_layers": 8, "num_items": 100_000})
  # 2 stages: stage 0 on A100 nodes (data=1: devices 0-15), stage 1 on H100s
  plan = sim.Plan(data=1, tensor=16, pipe=2, microbatches=4)
  with pytest.raises(ConfigError, match="tensor=32 must divide"):
    sim.simulate(m, batch, c, dataclasses.replace(plan, tensor=32, pipe=1))
  base = sim.Plan(data=2, tensor=8, pipe=2, microbatches=4, schedule="1f1b")
  speeds = sim.replica_stage_speeds(c, base)
  assert speeds[0, 0] < speeds[1, 1]  # the first replica's stages sit on A100s
  # A per-device roofline: an A100 is 312/989 of an H100 in FLOP/s, 2039/3350 in bandwidth;
  # MFU divides by the sum of each device's own peak.
  flops_bound, memory_bound = c.effective_speeds(1.0)[0], c.effective_speeds(0.0)[0]  # an A100
  assert flops_bound == pytest.approx(312 / 989) and memory_bound == pytest.approx(2039 / 3350)
  assert c.effective_speeds(0.5)[-1] == 1.0
  assert c.total_peak_flops == pytest.approx(16 * 312e12 + 16 * 989e12)
  # Batch shares in proportion to replica speed: every replica finishes with the harmonic
  # mean of the even-share times, faster than the A100 replicas alone.
  even = sim.simulate(m, batch, c, dataclasses.replace(base, pipe=1, tensor=8, data=4,
                                                       microbatches=1))
  shared = sim.simulate(m, batch, c, dataclasses.replace(base, pipe=1, tensor=8, data=4,
                                                         microbatches=1, batch_shares=True))
  assert shared.breakdown["pipeline"] < 0.8 * even.breakdown["pipeline"]
  share = cm.compute_share(c, m, 8)
  assert 0 < share < 1
  assert sim.replica_stage_speeds(c, base, m)[0, 0] == pytest.approx(c.effective_speeds(share)[0])
  best = planner.balanced_stages(m, batch, c, dataclasses.replace(base, data=1, tensor=8, pipe=4))
  assert best[0] + best[1] < best[2] + best[3]  # A100 stages take fewer blocks
  # balance: a stage measured 3x slower than predicted loses blocks, if it pays
  costs = [1.0] * 8
  new, why = balance.decide((2, 2, 2, 2), [2.0, 6.0, 2.0, 2.0], layer_costs=costs,
                            schedule="1f1b", microbatches=8, remaining_steps=1000,
                            bytes_per_layer=1e9, bandwidth=1e10, fixed_cost_s=5.0)
  assert why["rebalance"] and new[1] < 2 and sum(new) == 8
  json.dumps(why)
  same, why = balance.decide((2, 2, 2, 2), [2.0, 6.0, 2.0, 2.0], layer_costs=costs,
                             schedule="1f1b", microbatches=8, remaining_steps=3,
                             bytes_per_layer=1e12, bandwidth=1e10, fixed_cost_s=5.0)
  assert not why["rebalance"] and same == (2, 2, 2, 2) and "does not pay" in why["reason"]
  _, why = balance.decide((2, 2, 2, 2), [2.0, 2.05, 2.0, 2.0], layer_costs=costs,
                          remaining_steps=10**6, bytes_per_layer=0, bandwidth=1.0)
  assert not why["rebalance"]


def test_balance_checks_candidates_by_their_ticks():
  assert balance.neighbours((3, 1, 2)) == [(2, 2, 2), (3, 2, 1)]  # stages keep >= 1 block
  assert sorted(balance.neighbours((2, 2))) == [(1, 3), (3, 1)]
  # Two stages: blocks cost 1 forward + 2 backward; the head (6 units, forward and backward)
  # sits in the last stage's backward tick.
  ticks = lambda n0, n1: {"fwd": [n0, n1], "bwd": [2.0 * n0, 2.0 * n1 + 6.0]}
  measured = {p: ticks(*p) for p in [(4, 4), (5, 3), (6, 2)]}
  kw = dict(microbatches=8, remaining_steps=100, bytes_per_layer=0.0, bandwidth=1.0, min_gain=0.01)
  # (5, 3) evens the stages (15 vs 15, from 12 vs 18). Under GPipe (a forward phase, then a
  # backward phase as slow as its slowest stage) that is a faster step: it moves.
  new, why = balance.choose((4, 4), measured, schedule="gpipe", **kw)
  step = {tuple(c["stage_layers"]): c["step_s"] for c in why["candidates"]}
  assert new == (5, 3) and why["rebalance"] and step[5, 3] == min(step.values()), why
  # ... by 4.5%: not within a 5% noise margin
  new, why = balance.choose((4, 4), measured, schedule="gpipe", **{**kw, "min_gain": 0.05})
  assert new == (4, 4) and not why["rebalance"] and "below min_gain" in why["reason"], why
  # 1F1B's lock-step ticks pair one stage's forward with the other's backward: the even
  # split is slower there, so it stays.
  new, why = balance.choose((4, 4), measured, schedule="1f1b", **kw)
  assert new == (4, 4) and not why["rebalance"] and "already the best" in why["reason"], why
  # Candidates rank by the simulated step, not by the slowest stage: (3, 1)'s stages are
  # the more even (7 against 8), but its heavy forward and heavy backward sit on different
  # stages, and a GPipe step waits on each: 83 against 72.
  uneven = {(2, 2): {"fwd": [2.0, 2.0], "bwd": [2.0, 9.0]},
            (3, 1): {"fwd": [4.0, 1.0], "bwd": [2.0, 6.0]},
            (1, 3): {"fwd": [3.0, 3.0], "bwd": [5.0, 5.0]}}
  assert balance.best_measured((2, 2), uneven, "gpipe", 8) == (1, 3)
  with pytest.raises(ValueError, match="must include the current partition"):
    balance.choose((3, 5), measured, **kw)
  with pytest.raises(ValueError, match="positive forward and backward"):
    balance.choose((4, 4), {(4, 4): {"fwd": [1.0], "bwd": [1.0, 1.0]}}, **kw)


def test_chrome_trace_is_valid(tmp_path):
  c = cluster.preset("h100x8")
  plan = sim.Plan(data=2, tensor=2, pipe=2, schedule="1f1b", microbatches=4)
  r = sim.simulate(DEFAULT, sim.Batch(64, 64), c, plan, timeline=True)
  trace = json.loads(json.dumps(sim.chrome_trace(r)))
  events = trace["traceEvents"]
  spans = [e for e in events if e["ph"] == "X"]
  assert len(spans) > 2 * 4 * 2
  for e in spans:
    assert set(e) >= {"name", "ph", "ts", "dur", "pid", "tid"}
    assert isinstance(e["name"], str) and isinstance(e["pid"], int) and isinstance(e["tid"], int)
    assert e["ts"] >= 0 and e["dur"] >= 0
    assert e["ts"] + e["dur"] <= r.step_s * 1e6 * 1.0001 + 1
  names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
  assert {"stage 0", "stage 1", "pipe p2p", "data comm"} <= names
  assert any(n.startswith("tensor comm") for n in names)
  assert sum(e["name"].startswith("F") for e in spans) == 2 * 4


def test_this_machine_preset_and_errors():
  c = cluster.preset("this_machine")
  assert c.devices == 8 and c.shared_host
  assert cluster.preset("this_machine", processes=2).nodes == 2
  with pytest.raises(ConfigError, match="unknown cluster preset 'dgx'"):
    cluster.preset("dgx")
  with pytest.raises(ConfigError, match="whole nodes of 8"):
    cluster.preset("h100x8", devices=12)
  with pytest.raises(ConfigError, match="calibration file describes this machine"):
    cluster.preset("h100x8", calibration="x.json")
  with pytest.raises(ConfigError, match="cannot read the calibration file"):
    cluster.preset("this_machine", calibration="/nonexistent/cal.json")
  r = sim.simulate(DEFAULT, sim.Batch(64, 64), c, sim.Plan(data=4, tensor=2))
  assert r.step_s > 0 and r.fits


def test_alpha_beta_fit():
  from rec_llm.sim import measure
  sizes = [2**16, 2**19, 2**22]
  alpha, beta = measure.fit_alpha_beta(sizes, [1e-4 + b / 2e9 for b in sizes])
  assert alpha == pytest.approx(1e-4) and beta == pytest.approx(2e9)
  alpha, beta = measure.fit_alpha_beta(sizes, [b / 1e9 - 1e-6 for b in sizes])  # alpha < 0
  assert alpha == 0.0 and beta == pytest.approx(1e9, rel=0.01)


def test_step_corrections_fit_recovers_known_values():
  """Steps simulated with known corrections: the fit on them gets the corrections back, and
  a correction no fit plan exercises stays off."""
  from rec_llm.sim import calibrate
  truth = dict(compute_scale=0.8, tp_sync_s_per_byte=3e-9, tick_s=2e-3,
               pipe_buffer_s_per_byte=4e-10, process_compute_scale=1.8, inter_sync_s=0.03)
  plans = [(sim.Plan(data=4, tensor=2), 1), (sim.Plan(data=2, tensor=4), 1),
           (sim.Plan(data=4, pipe=2, schedule="1f1b", microbatches=8), 1),
           (sim.Plan(data=2, pipe=4, schedule="gpipe", microbatches=8), 1),
           (sim.Plan(data=2, tensor=2, pipe=2, schedule="gpipe", microbatches=4), 1),
           (sim.Plan(data=8), 2), (sim.Plan(data=4, pipe=2, schedule="1f1b", microbatches=8), 2)]
  names = list(truth)

  def step(corr, i):
    plan, processes = plans[i]
    c = dataclasses.replace(cluster.preset("this_machine", processes=processes),
                            **cluster.step_corrections({"step_corrections": corr}, processes))
    return sim.simulate(DEFAULT, sim.Batch(64, 64), c, plan).step_s

  measured = [step(truth, i) for i in range(len(plans))]
  got = calibrate.fit(step, measured, names)
  for k, v in truth.items():
    assert got[k] == pytest.approx(v, rel=0.02), k
  assert got["fit_rms_rel_error"] < 0.01
  no_pipe = calibrate.fit(step, measured[:2], names)
  assert "tick_s" not in no_pipe and "process_compute_scale" not in no_pipe
  assert "inter_sync_s" not in no_pipe
  # Steps far faster than the model: no correction goes below its lowest allowed value.
  fast = calibrate.fit(step, [0.05 * m for m in measured], names)
  for k in names:
    assert fast[k] >= calibrate.PARAMS[k][1], k
  assert fast["compute_scale"] == 0.25


_CLI_DRIVER = """
import sys
from experiments import cli, plan
for argv in (["plan", "--config=experiments/configs/default.py", "--cluster=nope"],
             ["plan", "--config=experiments/configs/default.py", "--cluster=this_machine",
              "--top=3", "--trace=" + sys.argv[1]]):
  cli.flags_parser("experiments.plan")(argv)
  try:
    plan.main(argv[:1])
    print("[exit 0]", flush=True)
  except SystemExit as e:
    print(f"[exit {e.code}]", flush=True)
"""


def test_plan_cli(tmp_path):
  """One subprocess runs the CLI's parse + main twice: a bad preset, then a good run."""
  trace = tmp_path / "trace.json"
  p = subprocess.run([sys.executable, "-c", _CLI_DRIVER, str(trace)], cwd=ROOT,
                     capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr[-2000:]
  assert "Traceback" not in p.stderr
  out = p.stdout.splitlines()
  assert out[0] == "[exit 2]" and out[-1] == "[exit 0]", p.stdout
  errors = [l for l in p.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "unknown cluster preset 'nope'" in errors[0], p.stderr
  rows = [l for l in out if l.strip()[:2].strip().isdigit()]
  assert len(rows) == 3 and "x" in rows[0].split()[1]
  assert json.loads(trace.read_text())["traceEvents"]


def _tables(per_token, tokens=(64, 128, 256, 512, 1024)):
  """Component tables whose block / head cost per token is per_token(n)."""
  s = [per_token(n) * n for n in tokens]
  return {"block": {"tokens": list(tokens), "fwd_s": [x / 3 for x in s], "bwd_s": [2 * x / 3 for x in s]},
          "embed": {"tokens": list(tokens), "fwd_bwd_s": [0.01 * x for x in s]},
          "head": {"tokens": list(tokens), "fwd_bwd_s": s}}


def test_shared_host_ticks_use_the_all_devices_busy_costs():
  """With all-devices-busy tables the host's tick costs come from them (per device op, summed
  over the busy devices): small ops that stay in cache make small microbatches cheaper, so a
  pipeline can beat data parallelism on shared cores; without them every plan's work adds up
  to the same and the pipeline can only cost more."""
  flat = _tables(lambda n: 1e-6)
  cached = _tables(lambda n: 0.6e-6 if n <= 256 else 1e-6)  # 40% cheaper in cache
  # No in-step corrections (a pipeline tick's fixed cost would decide on so little work).
  from rec_llm.sim import calibrate
  neutral = {k: v[0] for k, v in calibrate.PARAMS.items()}
  model = {k: getattr(DEFAULT, k) for k in ("num_items", "num_layers", "d_model", "num_heads",
                                            "mlp_dim", "max_len", "vocab_multiple", "dtype")}
  base = dataclasses.replace(cluster.preset("this_machine"), **neutral)
  plain = dataclasses.replace(base, components={"tables": {"1": flat}, "model": model})
  busy = dataclasses.replace(plain, components={"tables": {"1": flat}, "model": model,
                                                "busy": {"tables": {"1": cached}}})
  dp, pp = sim.Plan(data=8), sim.Plan(data=4, pipe=2, schedule="1f1b", microbatches=8)
  b = sim.Batch(64, 64)
  assert sim.simulate(DEFAULT, b, busy, pp).step_s < sim.simulate(DEFAULT, b, busy, dp).step_s
  assert sim.simulate(DEFAULT, b, plain, pp).step_s > sim.simulate(DEFAULT, b, plain, dp).step_s
  # DP: 8 busy devices, 512 tokens each: the busy table's cost, summed, is the compute.
  r = sim.simulate(DEFAULT, b, busy, dp)
  per_dev = sum(cm.component_time(busy, DEFAULT, k, 512, busy=True)
                for k in ("embed", "head")) + 4 * sum(
      cm.component_time(busy, DEFAULT, k, 512, busy=True) for k in ("block_fwd", "block_bwd"))
  assert r.breakdown["compute"] == pytest.approx(8 * per_dev * busy.compute_scale, rel=1e-6)
  # One device alone (1x1x1) is not a busy host: the single-device table.
  one = sim.simulate(DEFAULT, b, dataclasses.replace(busy, nodes=1, devices_per_node=1), sim.Plan())
  assert one.breakdown["compute"] == pytest.approx(
      busy.compute_scale * 1e-6 * 4096 * (1.01 + 4), rel=1e-6)


def test_busy_components_measures_every_split():
  """measure.busy_components on a tiny model: a table per tensor split, a point per row count,
  positive times, and tables that add back up to the measured points (rest + depth x block,
  an exact fit through two depths). Whether times grow with the rows is not asserted: at
  16 and 256 tokens this tiny model's step is dispatch-bound, and under a busy test run
  the two are within noise (CI once measured 26 ms for 16 tokens, 24 ms for 256)."""
  import jax
  from rec_llm.sim import measure
  tiny = dict(num_items=1023, num_layers=2, d_model=32, num_heads=2, mlp_dim=64, max_len=16,
              vocab_multiple=8, dtype="float32")
  out = measure.busy_components(tiny, rows=(1, 16), depths=(1, 2), devices=jax.devices()[:2],
                                repeats=1)
  assert out["devices"] == 2 and set(out["tables"]) == {"1", "2"}
  for tab in out["tables"].values():
    assert tab["block"]["tokens"] == [16, 256]
    for k, col in (("block", "fwd_s"), ("block", "bwd_s"), ("embed", "fwd_bwd_s"), ("head", "fwd_bwd_s")):
      assert all(v > 0 for v in tab[k][col]), (k, col)
    for i, r in enumerate(("1", "16")):
      block = tab["block"]["fwd_s"][i] + tab["block"]["bwd_s"][i]
      rest = tab["embed"]["fwd_bwd_s"][i] + tab["head"]["fwd_bwd_s"][i]
      if min(block, rest) > 2e-6:  # (a noisy point can make the fit negative: then clamped)
        assert [rest + k * block for k, _ in tab["points"][r]] == pytest.approx(
            [s for _, s in tab["points"][r]], rel=1e-9), r
  # The fit itself, on exact lines: a rest of 2 ms, 3 ms a block, split 1 : 2 and 3% : 97%.
  tab = measure._tables(16, {4: measure._fit_line((1, 2, 4), (5e-3, 8e-3, 14e-3))}, 0.03)
  assert tab["block"]["fwd_s"] == pytest.approx([1e-3]) and tab["block"]["bwd_s"] == pytest.approx([2e-3])
  assert tab["embed"]["fwd_bwd_s"] == pytest.approx([6e-5]) and tab["head"]["fwd_bwd_s"] == pytest.approx([1.94e-3])
  assert tab["block"]["tokens"] == [64]


def test_event_driven_and_interleaved_pipelines_match_their_formulas():
  """schedules.async_seconds: uniform stages give (M + P - 1)(f + b) for both schedules;
  Plan.virtual = v (interleaved 1F1B) shrinks the bubble to Megatron-LM's (P-1)/v / (M +
  (P-1)/v) (plus the extra sends' latency), and
  Plan.lockstep=False removes the lock-step ticks' extra idle time."""
  for kind, p, m in [("1f1b", 4, 8), ("gpipe", 4, 8), ("1f1b", 8, 24)]:
    s = schedules.build(kind, p, m)
    assert schedules.async_seconds(s, [1.0] * p, [2.0] * p) == pytest.approx((m + p - 1) * 3)
  big = dataclasses.replace(LARGE, num_layers=32, num_items=1000)  # a light head: even stages
  c, batch = cluster.preset("a100_80gb", 64), sim.Batch(512, 200)
  plan = sim.Plan(data=8, tensor=1, pipe=8, microbatches=16, remat=True, lockstep=False)
  one, two = (sim.simulate(big, batch, c, dataclasses.replace(plan, virtual=v)) for v in (1, 2))
  assert abs(one.bubble - schedules.analytic_bubble(8, 16)) < 0.03, one.bubble
  assert abs(two.bubble - 3.5 / (16 + 3.5)) < 0.03, two.bubble  # (P-1)/v / (M + (P-1)/v)
  lock = sim.simulate(big, batch, c, dataclasses.replace(plan, lockstep=True))
  assert lock.step_s > one.step_s
  with pytest.raises(ConfigError, match="virtual=3 stages need"):
    sim.simulate(big, batch, c, dataclasses.replace(plan, virtual=3))
  # Zero-bubble (ZB-H1): the weight gradients fill the bubble down to (P-1) forwards.
  zb = sim.simulate(big, batch, c, dataclasses.replace(plan, schedule=sim.ZERO_BUBBLE))
  assert zb.step_s < one.step_s and zb.bubble < one.bubble / 2, (zb.bubble, one.bubble)
  assert zb.memory["total"] == one.memory["total"]  # 1F1B's order and buffers
  with pytest.raises(ConfigError, match="zb-h1"):
    sim.simulate(big, batch, c, dataclasses.replace(plan, schedule=sim.ZERO_BUBBLE, lockstep=True))


def test_published_runs_counting_and_reproduction():
  """benchmarks/published.py: its FLOP counts are the sources' formulas, and with the A100
  efficiency fitted on Megatron-LM's 1.7B run the other Megatron-LM 2021 and Korthikanti et
  al. runs are predicted within 15% (the simulator's ground truth; README 'Published runs')."""
  from benchmarks import published
  runs = {r["id"]: r for r in published.RUNS}
  r = runs["korthikanti22_175b_sp"]
  layers, h, _, _, v, s = r["model"]
  b = r["batch"]
  assert published.model_flops(r) == pytest.approx(
      72 * b * s * layers * h * h * (1 + s / (6 * h) + v / (12 * layers * h)))
  # Megatron's count adds full recomputation's forward of the blocks (not of the logit layer).
  assert published.megatron_flops(r) == pytest.approx(
      96 * b * s * layers * h * h * (1 + s / (6 * h) + v / (16 * layers * h)))
  eff = published.fit_efficiency(runs["megatron21_1.7b"])
  assert 0.7 < eff < 0.9, eff
  for rid in ("megatron21_39b", "megatron21_1t", "korthikanti22_175b", "korthikanti22_1t_sp"):
    err = published._simulate(runs[rid], eff)[2]
    assert abs(err) < 0.15, (rid, err)


def test_flat_zero_splits_every_leaf_over_any_data_size():
  """Plan.zero_flat (a distributed optimizer's flat buffer): any data size, the state split
  evenly; rec_llm's own ZeRO splits `embed` and needs data to divide d_model."""
  c, batch = cluster.preset("h100", 48), sim.Batch(48 * 4, 200)
  plan = sim.Plan(data=48, zero=1)
  with pytest.raises(ConfigError, match="does not divide"):
    sim.simulate(LARGE, batch, c, plan)
  flat = dataclasses.replace(plan, zero_flat=True)
  held = sim.state_params(LARGE, flat, (LARGE.num_layers,))
  assert held["updated"] == pytest.approx(held["replica"] / 48)
  r = sim.simulate(LARGE, batch, c, flat)
  gathered = [x for x in sim.dp_reductions(LARGE, flat, LARGE.num_layers, 1)
              if x.aggregator == "all_gather"]
  assert gathered[0].numel == held["replica"] and r.step_s > 0


def test_sampled_head_prices_the_scored_items_and_keeps_the_table():
  """ModelSpec.negatives (train.loss 'sampled'): the head scores negatives/t + 1 items per
  position instead of the table's V/t rows, so its time and its logits' memory drop; the
  table's parameters, gradient and Adam state are the same; MFU counts arithmetic's FLOPs."""
  c, batch = cluster.preset("h100x8"), sim.Batch(64, 200)
  sampled = dataclasses.replace(LARGE, negatives=1024)
  for plan in (sim.Plan(data=8), sim.Plan(data=2, tensor=4), sim.Plan(data=4, tensor=2, zero=1)):
    full, samp = (sim.simulate(m, batch, c, plan) for m in (LARGE, sampled))
    t = plan.tensor
    assert cm.component_time(c, sampled, "head", 6400, t) < \
        cm.component_time(c, LARGE, "head", 6400, t) / 10
    # The sampled head's logits live for every position; the full softmax's for one chunk.
    n = 64 * 200 / plan.data
    chunk = vocab_parallel.chunking(int(n))[1]
    assert samp.memory["head"] == pytest.approx(n * 12 * (1024 / t + 1))
    assert full.memory["head"] == pytest.approx(
        chunk * 12 * LARGE.vocab_size / t + n * (8 * LARGE.d_model + 12))
    assert samp.memory["total"] < full.memory["total"] and samp.step_s < full.step_s
    for k in ("params", "grads", "adam"):
      assert samp.memory[k] == full.memory[k], k
    assert samp.dp_bytes == full.dp_bytes
    tokens = batch.global_batch * batch.seq_len
    assert samp.mfu * c.total_peak_flops * samp.step_s == pytest.approx(
        arithmetic.flops_per_token(LARGE, 200, 1024) * tokens)
  assert sim.state_params(sampled, plan, (24,)) == sim.state_params(LARGE, plan, (24,))


def test_sampled_head_from_config():
  """train.loss 'sampled' -> negatives; the full softmax (or no train section) -> 0, and
  to_dict then stays as it was before the field existed."""
  import ml_collections
  from experiments.configs import default
  config = default.get_config()
  assert cm.ModelSpec.from_config(config).negatives == 0
  assert "negatives" not in cm.ModelSpec.from_config(config).to_dict()
  config.train.loss, config.train.negatives = "sampled", 256
  assert cm.ModelSpec.from_config(config).negatives == 256
  assert cm.ModelSpec.from_config(config).to_dict()["negatives"] == 256
  bare = ml_collections.ConfigDict({"model": config.model.to_dict(), "data": config.data.to_dict()})
  assert cm.ModelSpec.from_config(bare).negatives == 0
  config.train.negatives = 0
  with pytest.raises(ConfigError, match="negatives"):
    cm.ModelSpec.from_config(config)
