"""One flat trainer: build the sharded run from a config, then loop, evaluate, checkpoint, log."""

import dataclasses
import functools
import json
import os
import signal
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from rec_llm.data import loader, sources
from rec_llm.errors import ConfigError, TrainingError
from rec_llm.eval.ranking import Evaluator
from rec_llm.models.seq_transformer import ModelConfig, SeqTransformer, count_params, flops_per_token
from rec_llm.parallel import mesh as mesh_lib
from rec_llm.parallel import sharding
from rec_llm.train import adaptive, checkpoint, config_check, dp_step, optimizer, throughput
from rec_llm.train import faults as faults_lib
from rec_llm.train.metric_writer import MetricWriter
from rec_llm.train.step import (TrainState, init_state, loss_fn,
                                make_pipelined_value_and_grad, make_train_step)


@dataclasses.dataclass
class Run:
  config: ConfigDict
  mesh: Mesh
  model_cfg: ModelConfig
  model: SeqTransformer
  source: sources.Source
  state_shardings: Any
  abstract_state: Any  # ShapeDtypeStructs with this mesh's shardings (restore target)
  init_fn: Any
  batches: loader.BatchMaker
  train_step: Any  # jitted (state, batch) -> (state, metrics); donates the state
  state: TrainState | None = None
  # (params, batch, model, num_valid) -> ((loss, aux), grads): the pipeline's when pipe > 1.
  value_and_grad: Any = None

  def compile(self, state=None) -> "CompiledStep":
    """Ahead-of-time compile for every batch width of this run: no recompiles in the loop."""
    state = self.state if state is None else state
    with sharding.activate(self.mesh):
      return CompiledStep({w: self.train_step.lower(state, self.batches.spec(w)).compile()
                           for w in self.batches.widths})


@dataclasses.dataclass
class CompiledStep:
  """(state, batch) -> (state, metrics), dispatched on the batch width (length buckets)."""
  executables: dict[int, Any]
  last_width: int | None = None

  def __call__(self, state, batch):
    width = batch["inputs"].shape[1]
    if self.last_width not in (None, width) and jax.devices()[0].platform == "cpu":
      # XLA:CPU runs collectives of queued programs on a shared thread pool; two different
      # programs in flight at once can wait on each other's rendezvous until it aborts
      # (seen on 2 cores). Let the previous step finish before switching programs.
      jax.block_until_ready(state)
    self.last_width = width
    return self.executables[width](state, batch)


def build(config: ConfigDict, devices: list[jax.Device] | None = None, init: bool = True) -> Run:
  devices = list(jax.devices() if devices is None else devices)
  shape = config_check.check(config, len(devices))
  mesh = mesh_lib.build_mesh(dict(zip(mesh_lib.MESH_AXES, shape)), devices)
  tc = config.train
  seed = int(tc.seed)
  source = sources.make_source(config.data, config.model.max_len + 1, int(tc.batch_size), seed)
  mc = config_check.check_model(config, source.num_items, shape[1])
  model = SeqTransformer(mc)
  tx = optimizer.make(tc)
  rng = jax.random.PRNGKey(seed)
  faults = faults_lib.from_config(tc)  # tests only
  use_dp = dp_step.uses_dp_step(config)
  local_sgd = use_dp and config.dp.mode == "local_sgd"
  # With local SGD the state's optimizer is the outer one; the inner one lives per replica.
  boxed = functools.partial(init_state, model,
                            dp_step.outer_optimizer(config.dp) if local_sgd else tx, mc.max_len)
  state_shardings = sharding.tree_shardings(jax.eval_shape(boxed, rng), mesh)
  make_state = lambda: nn.meta.unbox(boxed(rng))
  batches = loader.BatchMaker(source, int(tc.batch_size), mesh)
  if use_dp:
    inner = sharding.tree_shardings(jax.eval_shape(
        functools.partial(init_state, model, tx, mc.max_len), rng), mesh).opt_state
    step_fn = dp_step.DPStep(model, tx, mc.num_items + 1, mesh, state_shardings.params, inner,
                             config, faults=faults)
    state_shardings = state_shardings.replace(dp=step_fn.state_shardings())
    base_state = make_state
    make_state = lambda: (s := base_state()).replace(dp=step_fn.init(s.params))
    # Expand the per-device prefix shardings over the compressor state's leaves.
    state_shardings = jax.tree.map(lambda s, sub: jax.tree.map(lambda _: s, sub),
                                   state_shardings, jax.eval_shape(make_state))
    value_and_grad = None
  else:
    if shape[2] > 1:
      value_and_grad = make_pipelined_value_and_grad(
          mc, mc.num_items + 1, mesh, config_check.pipeline_config(config),
          param_shardings=state_shardings.params)
    else:
      value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    step_fn = make_train_step(model, tx, mc.num_items + 1, seed, dropout=mc.dropout_rate > 0,
                              faults=faults, value_and_grad=value_and_grad)
  # Created directly sharded: no host or device ever holds the whole model.
  init_fn = jax.jit(make_state, out_shardings=state_shardings)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(init_fn), state_shardings)
  batch_shardings = {"inputs": batches.sharding, "targets": batches.sharding}
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)
  run = Run(config, mesh, mc, model, source, state_shardings, abstract, init_fn, batches, jitted,
            value_and_grad=value_and_grad)
  if init:
    run.state = init_fn()
  return run


def check_workdir(workdir: str) -> None:
  """The workdir exists (created if need be) and takes a file, or one ConfigError, before
  anything is compiled."""
  probe = os.path.join(workdir, f".write_test_{jax.process_index()}_{os.getpid()}")
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"cannot create or write the workdir {workdir!r} ({e.strerror or e}); "
                      "give --workdir a directory you can write") from e


def to_host(tree):
  """Fetches replicated arrays (also across processes) as numpy values."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


class _Preemption:
  """SIGTERM asks the loop to save and exit at the next step boundary."""

  def __init__(self):
    self.requested = False
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no handler
      self._old = None

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def agreed(self) -> bool:
    """True on every process once any process was asked to stop."""
    if jax.process_count() == 1:
      return self.requested
    return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))

  def restore(self):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def make_evaluator(run: Run) -> Evaluator | None:
  ev = run.config.get("eval")
  if ev is None:
    return None
  return Evaluator(run.model, run.mesh, run.source, run.model_cfg.max_len,
                   int(ev.get("batch_size", 256)), ks=tuple(ev.get("ks", (10, 50, 200))),
                   num_negatives=int(ev.get("num_negatives", 0)), seed=int(run.config.train.seed),
                   filter_seen=bool(ev.get("filter_seen", False)))


def train(config: ConfigDict, workdir: str | None = None,
          devices: list[jax.Device] | None = None) -> list[dict]:
  """Trains to config.train.steps, resuming from workdir's latest checkpoint if there is one.

  Returns the records it logged (also appended to workdir/metrics.jsonl and TensorBoard).
  """
  t_begin = time.perf_counter()
  if workdir:
    check_workdir(workdir)
  run = build(config, devices, init=False)
  mc, tc = run.model_cfg, config.train
  ck_cfg = config.get("checkpoint", ConfigDict({"every_steps": 0, "max_to_keep": 3}))
  ckpt = checkpoint.Checkpointer(workdir, int(ck_cfg.get("max_to_keep", 3))) if workdir else None
  config_record = json.loads(config.to_json_best_effort())
  elapsed0 = 0.0
  try:
    restored = ckpt.restore_latest(run.abstract_state, config_record) if ckpt else None
  except Exception:
    ckpt.close()  # orbax's background threads must stop before the process exits
    raise
  if restored is not None:
    state, meta = restored
    restored_step = int(to_host(state.step))
    if int(meta["data_position"]) != restored_step:
      raise TrainingError(f"checkpoint {restored_step} is inconsistent: state step "
                          f"{restored_step} vs data position {meta['data_position']}")
    elapsed0 = float(meta.get("elapsed_s", 0.0))
    logging.info("resumed from %s at step %d", ckpt.directory, int(meta["step"]))
  else:
    state = run.init_fn()
  start = int(to_host(state.step))
  t0 = time.perf_counter()
  step_fn = run.compile(state)
  compile_s = time.perf_counter() - t0
  logging.info("mesh %s | data %s (%d items) | params: %s | compiled in %.1fs",
               mesh_lib.describe(run.mesh), run.source.name, mc.num_items,
               {k: f"{v:,}" for k, v in count_params(mc).items()}, compile_s)
  peak, peak_src = throughput.total_peak_flops(list(run.mesh.devices.flat),
                                               float(tc.get("peak_tflops", 0.0)))
  # Positions and model FLOPs of a step, by batch width (length buckets change both).
  tokens_of = {w: tc.batch_size * w for w in run.batches.widths}
  flops_of = {w: flops_per_token(mc, w) * tokens_of[w] for w in run.batches.widths}
  logging.info("peak %.3g FLOP/s (%s); %.3g model FLOPs per full-width step", peak, peak_src,
               flops_of[max(flops_of)])
  evaluator = make_evaluator(run)
  eval_every = int(config.get("eval", {}).get("every_steps", 0)) if evaluator else 0
  ck_every = int(ck_cfg.get("every_steps", 0))
  stop_on_nonfinite = tc.get("nonfinite", "skip") == "stop"
  bal = config.get("balance")
  balance_every = (int(bal.get("every_steps", 0)) if bal is not None and bal.get("adaptive")
                   and run.mesh.shape["pipe"] > 1 else 0)
  spe = run.source.steps_per_epoch

  writer, history = MetricWriter(workdir), []
  elapsed = lambda: elapsed0 + time.perf_counter() - t_begin

  def log(rec):
    rec = {**rec, "time_s": elapsed()}
    if spe:
      rec["epoch"] = rec["step"] / spe
    history.append(rec)
    writer.write(rec)

  def evaluate(done, splits):
    for split in splits:
      t = time.perf_counter()
      m = evaluator.evaluate(state.params, split)
      prefix = "eval" if split == "val" else "test"
      logging.info("step %d %s: %s (%.1fs)", done, split,
                   " ".join(f"{k} {v:.4f}" for k, v in m.items()), time.perf_counter() - t)
      log({"step": done, **{f"{prefix}/{k}": v for k, v in m.items()}})

  skipped_seen = int(to_host(state.skipped))  # those before a resume were reported then

  def check_finite(done, skipped):
    nonlocal skipped_seen
    if skipped > skipped_seen:
      msg = (f"{skipped - skipped_seen} step(s) up to step {done} had a non-finite loss, "
             f"gradient or update; their updates were dropped")
      if stop_on_nonfinite:
        raise TrainingError(msg + " and the run stops (train.nonfinite='stop'); the latest "
                            "checkpoint holds only finite values")
      logging.warning("%s (train.nonfinite='skip')", msg)
      skipped_seen = skipped

  def rebalance(done, batch):
    """Re-partitions the stages if measured costs say it pays; returns the new step."""
    nonlocal run, compile_s
    new, reason = adaptive.decide(run, state, batch, tc.steps - done, compile_s)
    rec = {"step": done, "balance": reason, "balance/rebalanced": int(reason["rebalance"])}
    if reason["rebalance"]:
      cfg = run.config.copy_and_resolve_references()
      cfg.pipeline.stage_layers = new
      t = time.perf_counter()
      run = build(cfg, devices, init=False)
      compiled = run.compile(state)
      compile_s = time.perf_counter() - t
      repeats = int(cfg.balance.get("repeats", 5))
      # Timed afresh (not the decision's numbers, which picked the fastest of several).
      before, after = adaptive.measure_stage_times(run, state, batch, (reason["current"], new),
                                                   repeats)
      before, after = adaptive.stage_seconds(before), adaptive.stage_seconds(after)
      rec.update({"balance/imbalance_before": adaptive.imbalance(before),
                  "balance/imbalance_after": adaptive.imbalance(after),
                  "balance/stage_s_before": before, "balance/stage_s_after": after})
    logging.info("step %d balance: %s", done, reason["reason"])
    log(rec)
    return compiled if reason["rebalance"] else None

  def save(done):
    check_finite(done, int(to_host(state.skipped)))  # refuse to save after a bad step
    ckpt.save(done, state, {"step": done, "data_position": done, "elapsed_s": elapsed(),
                            "mesh": mesh_lib.describe(run.mesh), "config": config_record})

  preempt = _Preemption()
  last_logged, t_last = start, time.perf_counter()
  win_tokens = win_flops = 0
  try:
    for step, batch in loader.prefetch(run.batches, start, tc.steps):
      state, metrics = step_fn(state, batch)
      done = step + 1
      width = batch["inputs"].shape[1]
      win_tokens, win_flops = win_tokens + tokens_of[width], win_flops + flops_of[width]
      if done == start + 1 or done % tc.log_every == 0 or done == tc.steps:
        m = to_host(metrics)  # the only host sync: at log steps
        now = time.perf_counter()
        window = now - t_last
        step_time = window / (done - last_logged)
        check_finite(done, int(m["skipped"]))
        rec = {"step": done, "loss": float(m["loss"]), "hr@10": float(m["hr@10"]),
               "grad_norm": float(m["grad_norm"]), "skipped": int(m["skipped"]),
               "step_time_s": step_time,
               "tokens_per_s": win_tokens / window, "mfu": win_flops / window / peak}
        eta = (now - t0) / (done - start) * (tc.steps - done)
        logging.info("step %d/%d | loss %.4f | hr@10 %.3f | %.3fs/step | %s tok/s | MFU %.2f%% | ETA %ds",
                     done, tc.steps, rec["loss"], rec["hr@10"], step_time,
                     f"{rec['tokens_per_s']:,.0f}", 100 * rec["mfu"], eta)
        log(rec)
        last_logged, t_last, win_tokens, win_flops = done, time.perf_counter(), 0, 0
      if balance_every and done % balance_every == 0 and done != tc.steps:
        step_fn = rebalance(done, batch) or step_fn
        t_last, win_tokens, win_flops = time.perf_counter(), 0, 0
      if evaluator and eval_every and done % eval_every == 0 and done != tc.steps:
        evaluate(done, ["val"])
        t_last, win_tokens, win_flops = time.perf_counter(), 0, 0
      if ckpt and ck_every and done % ck_every == 0:
        save(done)
      if preempt.agreed():
        if ckpt and ckpt.latest_step() != done:
          save(done)
        logging.warning("SIGTERM: saved step %d and stopped; run the same command to resume", done)
        return history
    done = int(to_host(state.step))
    if evaluator:
      evaluate(done, ["val", "test"])
    if ckpt and ckpt.latest_step() != done:
      save(done)
  finally:
    preempt.restore()
    if ckpt:
      ckpt.close()
    writer.close()
  run.state = state
  logging.info("finished %d steps in %.1fs", tc.steps, elapsed())
  return history
