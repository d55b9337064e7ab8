"""One flat trainer: build the sharded run from a config, then loop, log and write metrics."""

import dataclasses
import functools
import json
import os
import time
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ml_collections import ConfigDict

from rec_llm.data import loader, sources
from rec_llm.models.seq_transformer import ModelConfig, SeqTransformer, count_params, flops_per_token
from rec_llm.parallel import mesh as mesh_lib
from rec_llm.parallel import sharding
from rec_llm.train import config_check, optimizer, throughput
from rec_llm.train.step import TrainState, init_state, make_train_step


@dataclasses.dataclass
class Run:
  config: ConfigDict
  mesh: Mesh
  model_cfg: ModelConfig
  model: SeqTransformer
  state: TrainState
  state_shardings: Any
  batches: loader.BatchMaker
  train_step: Any  # jitted (state, batch) -> (state, metrics); donates the state

  def compile(self):
    """Ahead-of-time compile for this run's exact shapes: no recompiles in the loop."""
    with sharding.activate(self.mesh):
      return self.train_step.lower(self.state, self.batches(0)).compile()


def build(config: ConfigDict, devices: list[jax.Device] | None = None) -> Run:
  devices = list(jax.devices() if devices is None else devices)
  shape, mc = config_check.check(config, len(devices))
  mesh = mesh_lib.build_mesh(dict(zip(mesh_lib.MESH_AXES, shape)), devices)
  model = SeqTransformer(mc)
  tx = optimizer.make(config.train)
  seed = int(config.train.seed)
  rng = jax.random.PRNGKey(seed)
  boxed = functools.partial(init_state, model, tx, mc.max_len)
  state_shardings = sharding.tree_shardings(jax.eval_shape(boxed, rng), mesh)
  # Created directly sharded: no host or device ever holds the whole model.
  state = jax.jit(lambda r: nn.meta.unbox(boxed(r)), out_shardings=state_shardings)(rng)
  source = sources.make_source(config.data, mc.max_len + 1, seed)
  batches = loader.BatchMaker(source, int(config.train.batch_size), mesh)
  step_fn = make_train_step(model, tx, mc.num_items + 1, seed, dropout=mc.dropout_rate > 0)
  batch_shardings = {"inputs": batches.sharding, "targets": batches.sharding}
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, NamedSharding(mesh, P())), donate_argnums=0)
  return Run(config, mesh, mc, model, state, state_shardings, batches, jitted)


def to_host(tree):
  """Fetches replicated arrays (also across processes) as numpy values."""
  return jax.tree.map(lambda x: np.asarray(x.addressable_data(0)), tree)


def train(config: ConfigDict, workdir: str | None = None) -> list[dict]:
  """Trains for config.train.steps; returns the logged records (also in workdir/metrics.jsonl)."""
  run = build(config)
  mc, tc = run.model_cfg, config.train
  t0 = time.perf_counter()
  step_fn = run.compile()
  n_params = count_params(mc)
  logging.info("mesh %s | params: %s | compiled in %.1fs", mesh_lib.describe(run.mesh),
               {k: f"{v:,}" for k, v in n_params.items()}, time.perf_counter() - t0)
  peak, peak_src = throughput.total_peak_flops(list(run.mesh.devices.flat),
                                               float(tc.get("peak_tflops", 0.0)))
  tokens_per_step = tc.batch_size * mc.max_len
  flops_per_step = flops_per_token(mc, mc.max_len) * tokens_per_step
  logging.info("peak %.3g FLOP/s (%s); %.3g model FLOPs per step", peak, peak_src, flops_per_step)

  writer = None
  if workdir and jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    writer = open(os.path.join(workdir, "metrics.jsonl"), "a")
  history, state = [], run.state
  last_logged, t_last, t_start = 0, time.perf_counter(), time.perf_counter()
  try:
    for step, batch in loader.prefetch(run.batches, 0, tc.steps):
      state, metrics = step_fn(state, batch)
      done = step + 1
      if done == 1 or done % tc.log_every == 0 or done == tc.steps:
        m = to_host(metrics)  # the only host sync: at log steps
        now = time.perf_counter()
        step_time = (now - t_last) / (done - last_logged)
        rec = {"step": done, "loss": float(m["loss"]), "hr@10": float(m["hr@10"]),
               "grad_norm": float(m["grad_norm"]), "step_time_s": step_time,
               "tokens_per_s": tokens_per_step / step_time,
               "mfu": flops_per_step / step_time / peak}
        history.append(rec)
        eta = (now - t_start) / done * (tc.steps - done)
        logging.info("step %d/%d | loss %.4f | hr@10 %.3f | %.3fs/step | %s tok/s | MFU %.2f%% | ETA %ds",
                     done, tc.steps, rec["loss"], rec["hr@10"], step_time,
                     f"{rec['tokens_per_s']:,.0f}", 100 * rec["mfu"], eta)
        if writer:
          writer.write(json.dumps(rec) + "\n")
          writer.flush()
        last_logged, t_last = done, time.perf_counter()
  finally:
    if writer:
      writer.close()
  run.state = state
  return history
