"""The simulator's data-parallel bytes against the compiled training step's.

For every compressor and every aggregator it pairs with (payload.check), the real step
(trainer.build, data=4 x tensor=2, hierarchical groups of 2) is compiled, its collectives
over 'data' read from the HLO and converted to wire bytes (payload.hlo_wire_bytes), and
compared with `simulate(...).dp_bytes` for the same model and plan: what rec_llm/sim prices
is what the engine sends. Only the step is compiled (no init), with plain SGD (fewer ops to
compile; the gradients are the same).
"""

import math

import pytest

from experiments.configs import default
from rec_llm.errors import ConfigError
from rec_llm.models import arithmetic
from rec_llm.parallel import hlo_stats, payload, sharding
from rec_llm.sim import cluster, cost_model as cm, simulator as sim
from tests.helpers import tiny_config

DATA, TENSOR, GROUP = 4, 2, 2
# The step's metrics (loss, hr@10, target counts, finiteness flags) are all-reduced over
# 'data' too, as scalars: not the gradients', so left out. The smallest gradient collective
# here is far larger (top-k's index all-gather: >= 20 leaves x 4 replicas x 2 bytes).
METRIC_BYTES = 32
METRIC_SCALARS = 4


def _valid(kind, aggregator):
  try:
    payload.check(kind, aggregator, DATA, group=GROUP)
    return True
  except ConfigError:
    return False


COMBOS = [(kind, agg, "sync") for kind in payload.KINDS for agg in payload.AGGREGATORS
          if _valid(kind, agg)] + [("none", "psum", "stale")]  # the explicit step, uncompressed


def _config(kind, aggregator, mode):
  c = tiny_config(data=DATA, tensor=TENSOR)
  c.model.num_layers = 1  # one block has every kind of leaf; fewer ops to compile
  c.train.update(optimizer="sgd", momentum=0.0, grad_clip=0.0)
  c.dp.update(aggregator=aggregator, group=GROUP, mode=mode, staleness=int(mode == "stale"))
  c.dp.compression.kind = kind
  return c


def _measured(config) -> float:
  """Wire bytes per device of the compiled step's gradient collectives over 'data' (the
  metrics' all-reduces left out)."""
  from rec_llm.train import trainer
  run = trainer.build(config, init=False)
  with sharding.activate(run.mesh):
    text = run.train_step.lower(run.abstract_state,
                                run.batches.spec(max(run.batches.widths))).compile().as_text()
  by_kind = {}
  for col in hlo_stats.collectives(text, dict(run.mesh.shape)):
    if col.axes == "data" and not (col.kind == "all-reduce" and col.payload <= METRIC_BYTES):
      by_kind[col.kind] = by_kind.get(col.kind, 0) + col.payload * col.count
  return payload.hlo_wire_bytes(by_kind, DATA)


def _predicted(config) -> float:
  # 2 processes x 4 devices: data replicas 2 per node, the hierarchical group of the step
  c = cluster.preset("this_machine", processes=2)
  plan = sim.Plan(data=DATA, tensor=TENSOR, compression=config.dp.compression.kind,
                  aggregator=config.dp.aggregator, dp_mode=config.dp.mode,
                  staleness=config.dp.staleness)
  assert sim.data_group(c, plan) == GROUP
  batch = sim.Batch(int(config.train.batch_size), int(config.model.max_len))
  return sim.simulate(cm.ModelSpec.from_config(config), batch, c, plan).dp_bytes


@pytest.mark.parametrize("kind,aggregator,mode", COMBOS)
def test_simulated_dp_bytes_match_the_compiled_step(kind, aggregator, mode):
  config = _config(kind, aggregator, mode)
  measured, predicted = _measured(config), _predicted(config)
  print(f"{kind}/{aggregator}/{mode}: HLO {measured:,.1f} B, simulator {predicted:,.1f} B")
  # XLA's all-reduce combiner may fuse a few float32 metric scalars into a gradient psum:
  # the HLO may exceed the prediction by a whole number of them (at most METRIC_SCALARS),
  # never by anything else. Ring, hierarchical and sparse payloads must match exactly.
  fused = (measured - predicted) / (2 * (DATA - 1) / DATA * 4)
  assert fused == round(fused) and 0 <= fused <= METRIC_SCALARS, (measured, predicted)
  if aggregator != "psum":
    assert measured == predicted


def test_plan_defaults_mirror_the_default_config():
  """sim.Plan's reduction defaults are the trainer's (experiments/configs/default.py)."""
  dp, plan = default.get_config().dp, sim.Plan()
  assert (plan.compression, plan.aggregator, plan.dp_mode, plan.zero) == (
      dp.compression.kind, dp.aggregator, dp.mode, dp.zero)
  assert plan.stage_local == default.get_config().pipeline.stage_local
  assert (plan.ratio, plan.bits, plan.rank) == (
      dp.compression.ratio, dp.compression.bits, dp.compression.rank)


# data x tensor x pipe : dp.zero, GSPMD's step (the default): the layouts it runs.
LAYOUTS = ["8x1x1:0", "4x2x1:1", "2x4x1:3", "2x2x2:1", "2x1x4:0"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_gspmd_step_reduces_each_gradient_once(layout):
  """Over 'data', the compiled default step reduces the gradient of the parameters a device
  holds once: payloads (all-reduce result, reduce-scatter operand) within 5% of the
  analytic minimum, the bytes of one replica's gradient (the stage's blocks and the shared
  leaves with pipe > 1). Under dp.zero its all-gathers carry exactly the simulator's
  gathered parameters (sim.dp_reductions). XLA:CPU lowers a reduce-scatter as an
  all-reduce and a slice, so payloads, not wire bytes, are compared."""
  from rec_llm.train import trainer
  shape, zero = layout.split(":")
  data, tensor, pipe = (int(x) for x in shape.split("x"))
  c = tiny_config(data=data, tensor=tensor, pipe=pipe)
  c.model.num_layers = max(2, pipe)
  c.train.update(optimizer="sgd", momentum=0.0, grad_clip=0.0)
  c.dp.zero = int(zero)
  run = trainer.build(c, init=False)
  with sharding.activate(run.mesh):
    text = run.train_step.lower(run.abstract_state,
                                run.batches.spec(max(run.batches.widths))).compile().as_text()
  width = c.model.num_layers // pipe
  got = {"reduce": 0, "all-gather": 0}
  for col in hlo_stats.collectives(text, dict(run.mesh.shape), unknown_trip_count=width):
    if col.axes == "data" and col.payload > METRIC_BYTES * 4:  # not the metrics' scalars
      key = "all-gather" if col.kind == "all-gather" else "reduce"
      assert col.kind in ("all-reduce", "reduce-scatter", "all-gather"), col
      got[key] += col.payload * col.count
  m = cm.ModelSpec.from_config(c)
  plan = sim.Plan(data=data, tensor=tensor, pipe=pipe, zero=int(zero))
  minimum = 4 * sum(math.prod(s) for s in arithmetic.param_shapes(
      m, tensor, width if pipe > 1 else None).values())
  gathers = [r.numel for r in sim.dp_reductions(m, plan, width, 1) if r.aggregator == "all_gather"]
  print(f"{layout}: reduced {got['reduce']:,} B (minimum {minimum:,}), gathered "
        f"{got['all-gather']:,} B (simulator {4 * sum(gathers):,})")
  assert minimum <= got["reduce"] <= 1.05 * minimum
  assert got["all-gather"] == 4 * sum(gathers)
