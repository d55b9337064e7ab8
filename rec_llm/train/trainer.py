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
from rec_llm.parallel import schedules, sharding
from rec_llm.train import adaptive, checkpoint, config_check, dp_step, optimizer, state_layout
from rec_llm.train import throughput
from rec_llm.train import faults as faults_lib
from rec_llm.train.metric_writer import MetricWriter
from rec_llm.parallel import sampled_softmax
from rec_llm.train.step import (Head, TrainState, init_state, loss_fn,
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
  # The stored state beside the canonical one (checkpoints, eval, balancer): state_layout.py.
  layout: state_layout.StateLayout | None = None
  head: Head | None = None  # the training loss (full or sampled softmax)

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


def state_shardings_of(abstract_state, mesh: Mesh, zero: int, stage_local: bool):
  """The train state's shardings: the optimizer state split over 'data' from ZeRO stage 1,
  the parameters too at stage 3 (sharding.STATE_SPLIT); with `stage_local`, the blocks of
  both split over the stages (sharding.STAGE_SPLIT); the rest as the logical rules say."""
  plain = sharding.tree_shardings(abstract_state, mesh, stage_local=stage_local)
  if not zero:
    return plain
  split = sharding.tree_shardings(abstract_state, mesh, zero=True, stage_local=stage_local)
  return plain.replace(opt_state=split.opt_state, params=split.params if zero == 3 else plain.params)


def make_head(tc: ConfigDict, source: sources.Source, vocab_size: int) -> Head:
  """The training loss the config asks for; popularity counts come from the training data."""
  num_valid = source.num_items + 1
  if tc.loss == "softmax":
    return Head(num_valid)
  counts = None
  if tc.sampler == "popularity":
    counts = np.zeros(vocab_size, np.float32)  # padded table rows weigh nothing
    counts[:len(source.item_counts)] = source.item_counts[:num_valid]
  return Head(num_valid, sampled_softmax.Sampler(
      tc.sampler, int(tc.negatives), int(tc.neg_strata), int(tc.seed),
      tc.neg_share == sampled_softmax.SHARES[1], counts))


def build(config: ConfigDict, devices: list[jax.Device] | None = None, init: bool = True) -> Run:
  devices = list(jax.devices() if devices is None else devices)
  shape = config_check.check(config, len(devices))
  mesh = mesh_lib.build_mesh(dict(zip(mesh_lib.MESH_AXES, shape)), devices)
  tc = config.train
  seed = int(tc.seed)
  source = sources.make_source(config.data, config.model.max_len + 1, int(tc.batch_size), seed)
  mc = config_check.check_model(config, source.num_items, shape[1])
  head = make_head(tc, source, mc.vocab_size)
  model = SeqTransformer(mc)
  tx = optimizer.make(tc, moments=not dp_step.local_moments(config))
  rng = jax.random.PRNGKey(seed)
  faults = faults_lib.from_config(tc)  # tests only
  use_dp = dp_step.uses_dp_step(config)
  local_sgd = use_dp and config.dp.mode == "local_sgd"
  # With local SGD the state's optimizer is the outer one; the inner one lives per replica.
  boxed = functools.partial(init_state, model,
                            dp_step.outer_optimizer(config.dp) if local_sgd else tx, mc.max_len)
  stage_local = config_check.stage_local(config, shape)
  abstract_state = jax.eval_shape(boxed, rng)
  state_shardings = state_shardings_of(abstract_state, mesh, int(config.dp.zero), stage_local)
  sizes = schedules.stage_sizes(mc.num_layers, shape[2],
                                config_check.pipeline_config(config)["stage_layers"])
  layout = state_layout.make(
      abstract_state, sizes if stage_local else None, state_shardings,
      # Canonical blocks [L, ...] split over the stages where L divides evenly.
      state_shardings_of(abstract_state, mesh, int(config.dp.zero),
                         stage_local and mc.num_layers % shape[2] == 0))
  make_state = lambda: layout.to_stored(nn.meta.unbox(boxed(rng)))
  batches = loader.BatchMaker(source, int(tc.batch_size), mesh)
  if use_dp:
    inner = sharding.tree_shardings(jax.eval_shape(
        functools.partial(init_state, model, tx, mc.max_len), rng), mesh).opt_state
    step_fn = dp_step.DPStep(model, tx, head, mesh, state_shardings.params, inner,
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
          mc, head, mesh, config_check.pipeline_config(config),
          param_shardings=state_shardings.params, stage_local=stage_local)
    else:
      value_and_grad = jax.value_and_grad(loss_fn, has_aux=True)
    grad_shardings = (sharding.tree_shardings(abstract_state.params, mesh, zero=True,
                                              stage_local=stage_local)
                      if config.dp.zero else None)
    step_fn = make_train_step(model, tx, head, seed, dropout=mc.dropout_rate > 0,
                              faults=faults, value_and_grad=value_and_grad,
                              grad_shardings=grad_shardings)
  # Created directly sharded: no host or device ever holds the whole model.
  init_fn = jax.jit(make_state, out_shardings=state_shardings)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          jax.eval_shape(init_fn), state_shardings)
  batch_shardings = {"inputs": batches.sharding, "targets": batches.sharding}
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)
  run = Run(config, mesh, mc, model, source, state_shardings, abstract, init_fn, batches, jitted,
            value_and_grad=value_and_grad, layout=layout, head=head)
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
  """The held-out ranking evaluator, or None for a config without an `eval` section."""
  ev = run.config.get("eval")
  if ev is None:
    return None
  return Evaluator(run.model, run.mesh, run.source, run.model_cfg.max_len, int(ev.batch_size),
                   ks=tuple(ev.ks), num_negatives=int(ev.num_negatives),
                   seed=int(run.config.train.seed), filter_seen=bool(ev.filter_seen))


def canonical_abstract(run: Run):
  """The canonical state's ShapeDtypeStructs on this mesh: what checkpoints hold."""
  if run.layout.identity:
    return run.abstract_state
  shapes = jax.eval_shape(lambda s: run.layout.to_canonical(s), run.abstract_state)
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      shapes, run.layout.canonical_shardings)


def restore_or_init(run: Run, ckpt: checkpoint.Checkpointer | None, config_record: dict):
  """(state, seconds the run had already trained): the newest usable checkpoint's, or a
  fresh initialisation."""
  try:
    restored = (ckpt.restore_latest(canonical_abstract(run), config_record) if ckpt
                else None)
  except Exception:
    ckpt.close()  # orbax's background threads must stop before the process exits
    raise
  if restored is None:
    return run.init_fn(), 0.0
  state, meta = restored
  state = run.layout.stored(state)
  step = int(to_host(state.step))
  if int(meta["data_position"]) != step:
    raise TrainingError(f"checkpoint {step} is inconsistent: state step {step} vs data "
                        f"position {meta['data_position']}")
  logging.info("resumed from %s at step %d", ckpt.directory, int(meta["step"]))
  return state, float(meta["elapsed_s"])


def step_flops(run: Run) -> dict[int, float]:
  """Model FLOPs of one step by batch width (length buckets change it): the sampled head's
  scored items when it has one (arithmetic.flops_per_token)."""
  negatives = run.head.sampler.negatives if run.head and run.head.sampler else 0
  return {w: flops_per_token(run.model_cfg, w, negatives) * run.config.train.batch_size * w
          for w in run.batches.widths}


class Meter:
  """Throughput over the window since the last log: positions, model FLOPs, MFU, ETA."""

  def __init__(self, run: Run, start: int):
    tc = run.config.train
    # Positions and model FLOPs of a step, by batch width (length buckets change both).
    self.tokens_of = {w: tc.batch_size * w for w in run.batches.widths}
    self.flops_of = step_flops(run)
    self.peak, src = throughput.total_peak_flops(list(run.mesh.devices.flat),
                                                 float(tc.peak_tflops))
    logging.info("peak %.3g FLOP/s (%s); %.3g model FLOPs per full-width step", self.peak, src,
                 self.flops_of[max(self.flops_of)])
    self.t0 = self.t_last = time.perf_counter()
    self.start = self.last_logged = start
    self.tokens = self.flops = 0

  def add(self, width: int) -> None:
    self.tokens += self.tokens_of[width]
    self.flops += self.flops_of[width]

  def reset(self, done: int | None = None) -> None:
    """A new window (after a log, or after time spent outside training steps)."""
    self.t_last, self.tokens, self.flops = time.perf_counter(), 0, 0
    if done is not None:
      self.last_logged = done

  def record(self, done: int, total: int) -> dict:
    now = time.perf_counter()
    window = now - self.t_last
    rec = {"step_time_s": window / (done - self.last_logged), "tokens_per_s": self.tokens / window,
           "mfu": self.flops / window / self.peak,
           "eta_s": (now - self.t0) / (done - self.start) * (total - done)}
    self.reset(done)
    return rec


class NonFiniteSteps:
  """Reports steps the guard skipped (TrainState.skipped) once each; under
  train.nonfinite='stop' the first one ends the run."""

  def __init__(self, skipped: int, stop: bool):
    self.seen, self.stop = skipped, stop  # those before a resume were reported then

  def check(self, done: int, skipped: int) -> None:
    if skipped <= self.seen:
      return
    msg = (f"{skipped - self.seen} step(s) up to step {done} had a non-finite loss, gradient "
           "or update; their updates were dropped")
    if self.stop:
      raise TrainingError(msg + " and the run stops (train.nonfinite='stop'); the latest "
                          "checkpoint holds only finite values")
    logging.warning("%s (train.nonfinite='skip')", msg)
    self.seen = skipped


class Log:
  """Records to history, metrics.jsonl and TensorBoard, stamped with the run's seconds."""

  def __init__(self, workdir: str | None, elapsed, steps_per_epoch: int):
    self.writer, self.history = MetricWriter(workdir), []
    self.elapsed, self.spe = elapsed, steps_per_epoch

  def __call__(self, rec: dict) -> None:
    rec = {**rec, "time_s": self.elapsed()}
    if self.spe:
      rec["epoch"] = rec["step"] / self.spe
    self.history.append(rec)
    self.writer.write(rec)


def evaluate(evaluator: Evaluator, params, done: int, splits, log: Log) -> None:
  for split in splits:
    t = time.perf_counter()
    m = evaluator.evaluate(params, split)
    prefix = "eval" if split == "val" else "test"
    logging.info("step %d %s: %s (%.1fs)", done, split,
                 " ".join(f"{k} {v:.4f}" for k, v in m.items()), time.perf_counter() - t)
    log({"step": done, **{f"{prefix}/{k}": v for k, v in m.items()}})


def _log_step(done: int, total: int, metrics, meter: Meter, nonfinite: NonFiniteSteps,
              log: Log) -> None:
  m = to_host(metrics)  # the only host sync: at log steps
  nonfinite.check(done, int(m["skipped"]))
  rec = {"step": done, "loss": float(m["loss"]), "hr@10": float(m["hr@10"]),
         "grad_norm": float(m["grad_norm"]), "skipped": int(m["skipped"]),
         **meter.record(done, total)}
  logging.info("step %d/%d | loss %.4f | hr@10 %.3f | %.3fs/step | %s tok/s | MFU %.2f%% | "
               "ETA %ds", done, total, rec["loss"], rec["hr@10"], rec["step_time_s"],
               f"{rec['tokens_per_s']:,.0f}", 100 * rec["mfu"], rec.pop("eta_s"))
  log(rec)


class Profile:
  """A `jax.profiler` trace of steps [first, last) (train.profile_steps) into
  WORKDIR/profile, for TensorBoard's profile plugin (pip install xprof) or Perfetto."""

  def __init__(self, steps, workdir: str | None):
    self.first, self.last = (tuple(int(s) for s in steps) or (-1, -1)) if workdir else (-1, -1)
    self.dir = os.path.join(workdir, "profile") if workdir else None
    self.on = False

  def before(self, step: int) -> None:
    if step == self.first:
      jax.profiler.start_trace(self.dir)
      self.on = True

  def after(self, step: int, state) -> None:
    if self.on and step + 1 == self.last:
      self.stop(state)

  def stop(self, state=None) -> None:
    if self.on:
      jax.block_until_ready(state)  # the traced steps' device work, not just their dispatch
      jax.profiler.stop_trace()
      self.on = False
      logging.info("wrote a profile of steps %d-%d to %s", self.first, self.last - 1, self.dir)


def train(config: ConfigDict, workdir: str | None = None,
          devices: list[jax.Device] | None = None) -> list[dict]:
  """Trains to config.train.steps, resuming from workdir's latest checkpoint if there is one.

  Returns the records it logged (also appended to workdir/metrics.jsonl and TensorBoard).
  """
  t_begin = time.perf_counter()
  if workdir:
    check_workdir(workdir)
  run = build(config, devices, init=False)
  tc = config.train
  ckpt = (checkpoint.Checkpointer(workdir, int(config.checkpoint.max_to_keep))
          if workdir else None)
  config_record = json.loads(config.to_json_best_effort())
  state, elapsed0 = restore_or_init(run, ckpt, config_record)
  start = int(to_host(state.step))
  t0 = time.perf_counter()
  step_fn = run.compile(state)
  compile_s = time.perf_counter() - t0
  logging.info("mesh %s | data %s (%d items) | params: %s | compiled in %.1fs",
               mesh_lib.describe(run.mesh), run.source.name, run.model_cfg.num_items,
               {k: f"{v:,}" for k, v in count_params(run.model_cfg).items()}, compile_s)
  elapsed = lambda: elapsed0 + time.perf_counter() - t_begin
  meter, log = Meter(run, start), Log(workdir, elapsed, run.source.steps_per_epoch)
  evaluator = make_evaluator(run)
  eval_every = int(config.eval.every_steps) if evaluator else 0
  ck_every = int(config.checkpoint.every_steps) if ckpt else 0
  balance_every = (int(config.balance.every_steps) if config.balance.adaptive
                   and run.mesh.shape["pipe"] > 1 else 0)
  nonfinite = NonFiniteSteps(int(to_host(state.skipped)), tc.nonfinite == "stop")

  def save(done):
    nonfinite.check(done, int(to_host(state.skipped)))  # refuse to save after a bad step
    ckpt.save(done, run.layout.canonical(state),  # checkpoints hold the canonical layout
              {"step": done, "data_position": done, "elapsed_s": elapsed(),
               "mesh": mesh_lib.describe(run.mesh), "config": config_record})

  preempt, profile = _Preemption(), Profile(tc.profile_steps, workdir)
  try:
    for step, batch in loader.prefetch(run.batches, start, tc.steps):
      profile.before(step)
      state, metrics = step_fn(state, batch)
      profile.after(step, state)
      done = step + 1
      meter.add(batch["inputs"].shape[1])
      if done == start + 1 or done % tc.log_every == 0 or done == tc.steps:
        _log_step(done, tc.steps, metrics, meter, nonfinite, log)
      if balance_every and done % balance_every == 0 and done != tc.steps:
        run, step_fn, compile_s, state = adaptive.rebalance(
            run, state, batch, done, compile_s, lambda cfg: build(cfg, devices, init=False),
            step_fn, log)
        meter.reset()
      if eval_every and done % eval_every == 0 and done != tc.steps:
        evaluate(evaluator, run.layout.canonical(state.params, "params"), done, ["val"], log)
        meter.reset()
      if ck_every and done % ck_every == 0:
        save(done)
      if preempt.agreed():
        if ckpt and ckpt.latest_step() != done:
          save(done)
        logging.warning("SIGTERM: saved step %d and stopped; run the same command to resume", done)
        return log.history
    done = int(to_host(state.step))
    if evaluator:
      evaluate(evaluator, run.layout.canonical(state.params, "params"), done, ["val", "test"],
               log)
    if ckpt and ckpt.latest_step() != done:
      save(done)
  finally:
    profile.stop(state)
    preempt.restore()
    if ckpt:
      ckpt.close()
    log.writer.close()
  run.state = state
  logging.info("finished %d steps in %.1fs", tc.steps, elapsed())
  return log.history
