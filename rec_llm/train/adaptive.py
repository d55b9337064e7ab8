"""Adaptive load balancing of pipeline stages from measured costs (`balance` config).

Every `balance.every_steps` steps the trainer measures, on one device and with the live
parameters and a real microbatch, the forward + backward time of one block, of the
embedding and of the item head; rec_llm.sim.balance decides whether re-partitioning the
blocks pays (predicted saving over the remaining steps > a recompile), and if so the trainer
recompiles its step for the new `pipeline.stage_layers`. The live state moves to the new
partition's layout through the canonical one (rec_llm/train/state_layout.py: with
stage-local weights, blocks and their optimizer state move between stages): no restart, no
lost step, and the numbers are those of any other partition.
"""

import time

import jax
import numpy as np
from absl import logging
from ml_collections import ConfigDict

from rec_llm.parallel import pipeline, schedules
from rec_llm.sim import balance, measure, partition
from rec_llm.train import config_check
from rec_llm.train.step import stage_fns, with_step


def _one_device(run, state, batch):
  """Params and one microbatch on the first device; the stage functions."""
  dev = jax.devices()[0]
  params = jax.device_put(jax.device_get(run.layout.canonical(state.params, "params")), dev)
  p = config_check.pipeline_config(run.config)
  rows = run.config.train.batch_size // (run.mesh.shape["data"] * p["microbatches"])
  mb = {k: jax.device_put(np.asarray(jax.device_get(v))[:rows], dev) for k, v in batch.items()}
  mb = with_step(mb, state.step, run.head)
  shared = {k: v for k, v in params.items() if k != "blocks"}
  return stage_fns(run.model_cfg, run.head), params["blocks"], shared, mb, p


def measure_stage_times(run, state, batch, partitions, repeats: int = 5,
                        stat=np.min) -> list[dict[str, list[float]]]:
  """Each stage's forward-tick and backward-tick seconds for one microbatch under each
  partition in `partitions` (a list of stage_layers tuples): [{"fwd": [per stage], "bwd":
  [per stage]}], each the `stat` of `repeats` runs (the fastest by default, as noise only
  ever adds time). The programs are a pipeline tick's own code on one device
  (pipeline.stage_programs). Every (partition, stage, op) is timed once per round, so a
  burst of load on the host hits all of them alike and their comparison stays fair.
  """
  fns, blocks, shared, mb, p = _one_device(run, state, batch)
  calls, sizes = [], []
  for i, part in enumerate(partitions):
    fwd, bwd = pipeline.stage_programs(fns, shared, mb, tuple(part), remat=p["remat"])
    sizes.append(len(part))
    for s in range(len(part)):
      out = jax.block_until_ready(fwd(blocks, shared, s))  # compile / warm up
      jax.block_until_ready(bwd(blocks, shared, s, *out))
      calls += [((i, s, "fwd"), lambda f=fwd, s=s: f(blocks, shared, s)),
                ((i, s, "bwd"), lambda b=bwd, s=s, o=out: b(blocks, shared, s, *o))]
  runs = measure.time_interleaved(calls, repeats)
  return [{op: [float(stat(runs[i, s, op])) for s in range(n)] for op in ("fwd", "bwd")}
          for i, n in enumerate(sizes)]


def stage_seconds(ticks: dict) -> list[float]:
  """A stage's time for one microbatch: its forward tick plus its backward tick."""
  return [f + b for f, b in zip(ticks["fwd"], ticks["bwd"])]


def measure_costs(run, state, batch, repeats: int = 5) -> dict:
  """Forward + backward seconds of one block, of the embedding and of the item head (final
  norm + softmax cross-entropy) for one microbatch, each timed on its own: the fastest of
  `repeats` runs, since on a shared machine noise only ever adds time."""
  fns, blocks, shared, mb, p = _one_device(run, state, batch)
  layer = jax.checkpoint(fns.layer) if p["remat"] else fns.layer
  one = jax.tree.map(lambda a: a[0], blocks)
  x = fns.first(shared, mb)
  parts = {
      "embed_s": (jax.jit(jax.grad(lambda sh: fns.first(sh, mb).sum())), (shared,)),
      "block_s": (jax.jit(jax.grad(lambda lp, x: layer(lp, x, mb).sum(), argnums=(0, 1))),
                  (one, x)),
      "head_s": (jax.jit(jax.grad(lambda sh, x: fns.last(sh, x, mb)[0], argnums=(0, 1))),
                 (shared, x)),
  }
  return {name: measure.time_call(fn, *args, repeats=repeats, stat=min)
          for name, (fn, args) in parts.items()}


SEARCH_ROUNDS = 4


def current_partition(config: ConfigDict, num_layers: int, stages: int) -> tuple[int, ...]:
  return schedules.stage_sizes(num_layers, stages,
                              config_check.pipeline_config(config)["stage_layers"])


def decide(run, state, batch, remaining_steps: int, recompile_s: float) -> tuple[tuple, dict]:
  """(stage_layers to use, the decision record to log).

  The partition solver, fed the measured costs of one block, the embedding and the head,
  proposes a partition; the current partition, the proposal and the proposal's neighbours
  (one block moved across one boundary) are then timed tick by tick on the device. While
  a neighbour's simulated step is faster, the search moves there and times its neighbours
  (at most SEARCH_ROUNDS rounds, all candidates of a round interleaved). The best one is
  taken if the simulated schedule says it pays (rec_llm.sim.balance.choose). The search
  matters: a block inside a stage's loop costs more than one timed alone, and by how much
  depends on the code XLA generates, so the model's split can be blocks off.
  """
  t = time.perf_counter()
  cfg = run.config
  layers, stages = run.model_cfg.num_layers, run.mesh.shape["pipe"]
  repeats = int(cfg.balance.repeats)
  costs = measure_costs(run, state, batch, repeats)
  part = current_partition(cfg, layers, stages)
  block_costs = [costs["block_s"]] * layers
  model_s = partition.stage_times(part, block_costs, costs["embed_s"], costs["head_s"])
  p = config_check.pipeline_config(cfg)
  judge = dict(schedule=p["schedule"], microbatches=p["microbatches"],
               remaining_steps=remaining_steps, bytes_per_layer=0.0, bandwidth=1.0,
               fixed_cost_s=(float(cfg.balance.fixed_cost_s) if cfg.balance.fixed_cost_s >= 0
                             else recompile_s),
               min_gain=float(cfg.balance.min_gain))
  proposed, _ = partition.solve(block_costs, stages, costs["embed_s"], costs["head_s"])
  best, rounds = proposed, 0
  while True:  # local search from the model's proposal, on measured ticks
    candidates = list(dict.fromkeys([part, best] + balance.neighbours(best)))
    measured = dict(zip(candidates, measure_stage_times(run, state, batch, candidates,
                                                        repeats)))
    rounds += 1
    moved = balance.best_measured(part, measured, p["schedule"], p["microbatches"])
    if moved in (best, part) or rounds == SEARCH_ROUNDS:
      break
    best = moved
  new, reason = balance.choose(part, measured, **judge)
  reason.update(costs, model_proposed=list(proposed), model_stage_s=list(model_s),
                search_rounds=rounds, measure_s=time.perf_counter() - t)
  return tuple(new), reason


def rebalance(run, state, batch, done: int, compile_s: float, rebuild, step_fn, log):
  """At step `done`: re-partitions the stages if measured costs say it pays (`decide`).

  Returns (run, compiled step, its compile seconds, state): new ones after a re-partition
  (`rebuild` makes the run of a config; the state moves into its layout), else those given.
  Logs the decision, and after a re-partition the stage times before and after, timed afresh
  (not the decision's numbers, which picked the fastest of several)."""
  cfg = run.config
  new, reason = decide(run, state, batch, cfg.train.steps - done, compile_s)
  rec = {"step": done, "balance": reason, "balance/rebalanced": int(reason["rebalance"])}
  if reason["rebalance"]:
    cfg = cfg.copy_and_resolve_references()
    cfg.pipeline.stage_layers = new
    t = time.perf_counter()
    old, run = run, rebuild(cfg)
    state = jax.jit(lambda s: run.layout.to_stored(old.layout.to_canonical(s)),
                    out_shardings=run.state_shardings)(state)
    step_fn = run.compile(state)
    compile_s = time.perf_counter() - t
    before, after = measure_stage_times(run, state, batch, (reason["current"], new),
                                        int(cfg.balance.repeats))
    before, after = stage_seconds(before), stage_seconds(after)
    rec.update({"balance/imbalance_before": imbalance(before),
                "balance/imbalance_after": imbalance(after),
                "balance/stage_s_before": before, "balance/stage_s_after": after})
  logging.info("step %d balance: %s", done, reason["reason"])
  log(rec)
  return run, step_fn, compile_s, state


def imbalance(stage_s) -> float:
  """max / mean of the stages' times (1.0: perfectly balanced)."""
  s = np.asarray(stage_s, float)
  return float(s.max() / s.mean())
