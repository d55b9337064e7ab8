"""Simulate one training step of a plan on a cluster: time, throughput, MFU, memory, timeline.

The step, as rec_llm/train and rec_llm/parallel run it:
1. Pipeline (or one forward + backward when pipe = 1): the schedule's tick table
   (rec_llm/parallel/schedules.py). In a tick each stage runs at most one op; Megatron
   all-reduces over `tensor` block it; then activations and gradients move one stage
   (two collective-permutes, sent every tick). Ticks are lock-step: a tick lasts as long
   as its slowest stage. The last stage runs the head forward + backward in its backward op.
2. Gradients of the stages' blocks are gathered over `pipe` and the shared ones summed.
3. The data-parallel reduction of the gradient leaves as the engine holds them, priced by
   rec_llm/parallel/payload.py (the bytes the compressors and aggregators send), overlapped
   with the backward as far as the step, the cluster and the DP mode allow.
4. The optimizer, on every device for all its (tensor-split) parameters: parameters stay in
   the canonical layout, replicated over `data` and `pipe`.

Devices are placed with `tensor` innermost, then `pipe`, then `data` (so `data` is the axis
that spans nodes, as rec_llm/parallel/mesh.py places processes).
"""

import dataclasses
import functools
import math

import numpy as np

from rec_llm.errors import ConfigError
from rec_llm.models import arithmetic
from rec_llm.parallel import payload, schedules
from rec_llm.sim import cost_model as cm
from rec_llm.sim.cluster import Cluster, collective_time

TICK_OPS = 20  # dispatches per pipeline tick beyond the ops themselves (conds, slot updates)
# Zero-bubble pipelining (ZB-H1, Qi et al., arXiv:2401.10241): the backward split into its
# input-gradient half, on the critical path, and its weight-gradient half, which fills the
# bubbles; 1F1B's order and memory, a bubble of (P-1) x (f + b/2 - b/2) instead of
# (P-1) x (f + b). Cost model only.
ZERO_BUBBLE = "zb-h1"


@dataclasses.dataclass(frozen=True)
class Batch:
  global_batch: int
  seq_len: int


@dataclasses.dataclass(frozen=True)
class Plan:
  """A mesh, its pipeline and its data-parallel reduction. The reduction's defaults mirror
  the `dp` section of experiments/configs/default.py (which rec_llm cannot import)."""
  data: int = 1
  tensor: int = 1
  pipe: int = 1
  schedule: str = "1f1b"
  microbatches: int = 1
  stage_layers: tuple = ()        # blocks per stage; () = as even as possible
  remat: bool = False
  compression: str = "none"       # payload.KINDS
  ratio: float = 0.01             # top-k / random-k density
  bits: int = 8                   # QSGD bits
  rank: int = 4                   # PowerSGD rank
  dp_mode: str = "sync"           # 'sync' | 'stale' | 'local_sgd'
  staleness: int = 1              # 'stale': steps a reduction may lag
  local_steps: int = 1            # 'local_sgd': steps between synchronisations
  aggregator: str = "psum"        # 'psum' | 'ring' | 'hierarchical' | 'sparse'
  zero: int = 0                   # dp.zero: 0 replicated, 1 optimizer state, 3 parameters too
  stage_local: bool = True        # pipeline.stage_local
  # pipe = 1 with microbatches > 1: run them one after another, accumulating gradients (as
  # Megatron-LM and MaxText do; rec_llm's engine does not, so the planner never sets it).
  accumulate: bool = False
  # Megatron-LM's interleaved 1F1B: each stage holds `virtual` chunks of its blocks, a
  # microbatch visits every stage `virtual` times; the bubble shrinks by `virtual`, the
  # pipe sends grow by it. Cost model only: rec_llm's pipeline runs one chunk per stage.
  virtual: int = 1
  # rec_llm's pipeline runs lock-step ticks (a tick lasts as long as its slowest stage);
  # False: each stage runs its next op as soon as its input arrives (Megatron-LM).
  lockstep: bool = True
  # Best practice beyond rec_llm's engine (cost model only; the planner does not set them):
  # sequence parallelism splits the [d]-wide activations and element-wise work over tensor;
  # selective recomputation stores no attention scores and recomputes the attention core in
  # the backward (with remat False); overlap_tensor hides tensor collectives behind the
  # matmuls (XLA's collective matmul, Megatron-LM's tp-comm-overlap).
  sequence_parallel: bool = False
  selective: bool = False
  overlap_tensor: bool = False
  # Heterogeneous clusters: each data replica gets a share of the batch proportional to its
  # speed, so all finish together. Simulated only: rec_llm's SPMD step splits the batch
  # evenly (the planner tries it where replicas differ in speed, planner.share_variants).
  batch_shares: bool = False
  # ZeRO over a flat buffer (Megatron-LM's distributed optimizer, DeepSpeed): every leaf
  # split over data, whatever its shapes; rec_llm splits each leaf's `embed` axis instead.
  zero_flat: bool = False

  @property
  def mesh(self) -> str:
    return f"{self.data}x{self.tensor}x{self.pipe}"

  def compression_label(self) -> str:
    c = self.compression
    arg = {"topk": f"{self.ratio:g}", "qsgd": f"{self.bits}b", "powersgd": f"r{self.rank}"}.get(c)
    label = c if arg is None else f"{c}:{arg}"
    if self.data > 1 and (self.aggregator != "psum" or c != "none"):
      label += f"/{self.aggregator}"
    if self.dp_mode == "stale":
      label += f" stale{self.staleness}"
    elif self.dp_mode == "local_sgd":
      label += f" local{self.local_steps}"
    return label


def check_plan(m: cm.ModelSpec, batch: Batch, c: Cluster, plan: Plan) -> tuple[int, ...]:
  """Raises ConfigError naming the first problem; returns the stage sizes."""
  d, t, p = plan.data, plan.tensor, plan.pipe
  if min(d, t, p) < 1 or d * t * p != c.devices:
    raise ConfigError(f"plan mesh {plan.mesh} uses {d * t * p} devices but cluster {c.name!r} "
                      f"has {c.devices}; make data*tensor*pipe = {c.devices}")
  if m.num_heads % t or m.mlp_dim % t or m.vocab_size % t:
    raise ConfigError(f"tensor={t} must divide num_heads={m.num_heads}, mlp_dim={m.mlp_dim} "
                      f"and the {m.vocab_size} table rows")
  if p > m.num_layers:
    raise ConfigError(f"pipe={p} stages but only {m.num_layers} blocks")
  if batch.global_batch % d or (batch.global_batch // d) % plan.microbatches:
    raise ConfigError(f"microbatches={plan.microbatches} x data={d} must divide the global "
                      f"batch {batch.global_batch}")
  if p == 1 and plan.microbatches != 1 and not plan.accumulate:
    raise ConfigError("microbatches > 1 needs pipe > 1 (the trainer has no gradient accumulation)")
  if plan.virtual > 1 and (p == 1 or plan.schedule != "1f1b" or m.num_layers % (p * plan.virtual)
                          or plan.stage_layers):
    raise ConfigError(f"virtual={plan.virtual} stages need pipe > 1, the 1f1b schedule and "
                      f"even stages whose {m.num_layers} blocks split into pipe x virtual chunks")
  if plan.schedule == ZERO_BUBBLE and (plan.lockstep or plan.virtual > 1):
    raise ConfigError(f"schedule {ZERO_BUBBLE!r} is modelled for stages that run as soon as "
                      "their input arrives (lockstep=False), without virtual stages")
  if plan.schedule not in schedules.SCHEDULES + (ZERO_BUBBLE,):
    raise ConfigError(f"schedule {plan.schedule!r} is unknown; choose one of "
                      f"{list(schedules.SCHEDULES) + [ZERO_BUBBLE]}")
  if plan.zero not in (0, 1, 3):
    raise ConfigError(f"zero={plan.zero!r} is unknown; choose 0, 1 or 3 (dp.zero)")
  if plan.zero and m.d_model % d and not plan.zero_flat:
    raise ConfigError(f"zero={plan.zero} splits state along d_model={m.d_model}, which data={d} "
                      "does not divide")
  if plan.zero == 3 and (p > 1 or uses_dp_step(plan)):
    raise ConfigError("zero=3 runs with GSPMD's step at pipe=1 only (as the trainer); use zero=1")
  if plan.dp_mode not in payload.DP_MODES:
    raise ConfigError(f"dp_mode {plan.dp_mode!r} is unknown; choose one of {list(payload.DP_MODES)}")
  # the compressor and aggregator as rec_llm.parallel.compression.make checks them
  payload.check(plan.compression, plan.aggregator, d, plan.ratio, plan.bits, plan.rank,
                data_group(c, plan))
  sizes = schedules.stage_sizes(m.num_layers, p, plan.stage_layers)
  if len(sizes) != p or sum(sizes) != m.num_layers or min(sizes) < 1:
    raise ConfigError(f"stage_layers={list(sizes)} must give {p} stages of >= 1 block summing "
                      f"to {m.num_layers}")
  return sizes


@functools.lru_cache(maxsize=4096)
def _schedule(kind: str, stages: int, microbatches: int) -> schedules.Schedule:
  kind = "1f1b" if kind == ZERO_BUBBLE else kind  # (ZB-H1 keeps 1F1B's order)
  # One stage: its microbatches one after another, each forward then backward (1F1B's
  # table), one in flight (gradient accumulation).
  return schedules.build(kind if stages > 1 else "1f1b", stages, microbatches)


def axis_groups(c: Cluster, plan: Plan) -> dict:
  """Per mesh axis: (size, level, members per node) with tensor innermost, then pipe, data."""
  out, stride = {}, 1
  for axis, n in (("tensor", plan.tensor), ("pipe", plan.pipe), ("data", plan.data)):
    dpn = c.devices_per_node
    if stride * n <= dpn:
      out[axis] = (n, "intra", n)
    else:
      out[axis] = (n, "inter", max(1, dpn // stride))
    stride *= n
  return out


def data_group(c: Cluster, plan: Plan) -> int:
  """Data replicas per node: the 'hierarchical' aggregator's group (1: no two share one)."""
  n, _, per_node = axis_groups(c, plan)["data"]
  return per_node if n % per_node == 0 else 1


def replica_stage_speeds(c: Cluster, plan: Plan, m: cm.ModelSpec | None = None) -> np.ndarray:
  """[data, pipe] speed of each (replica, stage): its slowest tensor-parallel device, each
  device's FLOP/s and bandwidth weighted by the model's blocks' roofline (compute speed
  alone without `m`)."""
  share = 1.0 if m is None or not c.speed else cm.compute_share(
      c, m, plan.tensor, plan.sequence_parallel)
  s = np.asarray(c.effective_speeds(share), float).reshape(plan.data, plan.pipe, plan.tensor)
  return s.min(axis=2)


@dataclasses.dataclass
class StageCosts:
  """Per stage, one microbatch on one device at speed 1 (seconds)."""
  fwd: np.ndarray          # compute of a forward op
  bwd: np.ndarray          # compute of a backward op (the last stage: + head fwd + bwd)
  tp_fwd: np.ndarray       # tensor all-reduces inside a forward op
  tp_bwd: np.ndarray
  host_fwd: np.ndarray     # shared host, every device busy: host seconds per device op
  host_bwd: np.ndarray
  head: float              # the head's forward + backward (inside bwd[-1])
  tick_extra: float        # per tick, every stage: slot bookkeeping and dispatch
  p2p: float               # per tick: the two collective-permutes (0 when pipe = 1)
  tokens: int              # tokens per microbatch per device
  tensor: int              # the tensor split of the ops


def stage_costs(m: cm.ModelSpec, batch: Batch, c: Cluster, plan: Plan, sizes) -> StageCosts:
  d_, t, p, mb, v = plan.data, plan.tensor, plan.pipe, plan.microbatches, plan.virtual
  rows = batch.global_batch // (d_ * mb)
  n = rows * batch.seq_len
  mr = dataclasses.replace(m, max_len=batch.seq_len)  # attention over the batch's width
  k = c.compute_scale * (c.pipe_compute_scale if p > 1 else 1.0)
  sp = plan.sequence_parallel
  bf = k * cm.component_time(c, mr, "block_fwd", n, t, sp=sp)
  bb = k * cm.component_time(c, mr, "block_bwd", n, t, sp=sp) + (bf if plan.remat else 0.0)
  if plan.selective and not plan.remat:
    bb += k * cm.attention_core_time(c, mr, n, t)
  emb = k * cm.component_time(c, mr, "embed", n, t)
  head = k * cm.component_time(c, mr, "head", n, t)
  L = np.asarray(sizes, float) / v  # an op runs one chunk: 1/virtual of the stage's blocks

  def per_stage(bf, bb, emb, head):
    # (interleaved: the embedding and head run in one of a microbatch's `virtual` visits,
    # spread here over all of them)
    fwd, bwd = L * bf, L * bb
    fwd[0] += emb / (2 * v)
    bwd[0] += emb / (2 * v)
    bwd[-1] += head / v  # the pipeline runs the head in the last stage's backward tick
    return fwd, bwd

  fwd, bwd = per_stage(bf, bb, emb, head)
  if c.shared_host and (c.components or {}).get("busy"):
    # The host is full: what a device's op costs then was measured with all devices busy
    # (its size decides whether it stays in the shared cache); processes slow each other.
    kh = k * c.process_compute_scale
    hf = kh * cm.component_time(c, mr, "block_fwd", n, t, busy=True)
    hb = kh * cm.component_time(c, mr, "block_bwd", n, t, busy=True) + (hf if plan.remat else 0.0)
    host_fwd, host_bwd = per_stage(hf, hb, kh * cm.component_time(c, mr, "embed", n, t, busy=True),
                                   kh * cm.component_time(c, mr, "head", n, t, busy=True))
  else:  # single-device times, devices at once gaining the host speedup
    g = cm.host_speedup(c, 2)
    host_fwd, host_bwd = fwd / g, bwd / g
  groups = axis_groups(c, plan)
  act = n * m.d_model * m.act_bytes
  tp_fwd, tp_bwd = np.zeros(p), np.zeros(p)
  if t > 1:
    lvl = groups["tensor"][1]
    # + tp_sync_s_per_byte: what a collective costs inside a step beyond its isolated
    # microbenchmark: on a shared host the devices' threads wait for each other at each
    # one, longer the more work came before it, i.e. the more activation bytes it carries
    # (fitted, calibrate.py).
    ar = lambda b: collective_time(c, "all-reduce", b, t, lvl) + c.tp_sync_s_per_byte * b
    shape = cm.BLOCK_SHAPES[m.block]
    fwd_ar = sum(ar(k * act) for k in shape["fwd_allreduces"])
    tp_fwd = L * fwd_ar
    tp_bwd = L * (sum(ar(k * act) for k in shape["bwd_allreduces"]) + (fwd_ar if plan.remat else 0.0))
    tp_fwd[0] += ar(act) / v                        # embedding lookup psum
    tp_bwd[-1] += (ar(act) + 4 * ar(4 * rows * batch.seq_len)) / v  # head: dh, softmax statistics
  tick_extra, p2p = 0.0, 0.0
  if p > 1:
    tick_extra = TICK_OPS * c.call_overhead
    p2p = 2 * collective_time(c, "collective-permute", act, p, groups["pipe"][1])
  if plan.overlap_tensor:  # only what the op's own compute does not cover stays exposed
    tp_fwd, tp_bwd = np.maximum(tp_fwd - fwd, 0.0), np.maximum(tp_bwd - bwd, 0.0)
  return StageCosts(fwd, bwd, tp_fwd, tp_bwd, host_fwd, host_bwd, head, tick_extra, p2p, n, t)


def _tick_times(sched: schedules.Schedule, costs: StageCosts, speed: np.ndarray, c: Cluster,
                devices_per_stage: int):
  """(tick seconds [ticks], compute part [ticks], per-op compute [ticks, stages])."""
  op = sched.op
  comp = np.where(op == schedules.FWD, costs.fwd / speed,
                  np.where(op == schedules.BWD, costs.bwd / speed, 0.0))
  comm = np.where(op == schedules.FWD, costs.tp_fwd, np.where(op == schedules.BWD, costs.tp_bwd, 0.0))
  work = comp + costs.tick_extra
  if c.shared_host:  # every device's work shares the host's cores
    busy = (op != schedules.IDLE).sum(axis=1) * devices_per_stage
    host = np.where(op == schedules.FWD, costs.host_fwd / speed,
                    np.where(op == schedules.BWD, costs.host_bwd / speed, 0.0))
    host = np.where((busy > 1)[:, None], host + costs.tick_extra, work)
    tick_comp = np.maximum(host.sum(axis=1) * devices_per_stage, work.max(axis=1))
    tick = tick_comp + comm.max(axis=1)
  else:
    tick_comp = work.max(axis=1)
    tick = (work + comm).max(axis=1)
  if len(costs.fwd) > 1:  # the pipeline's fixed cost per tick (fitted, calibrate.py)
    tick = tick + c.tick_s
  return tick + costs.p2p, tick_comp, comp


def pipeline_seconds(fwd, bwd, schedule: str, microbatches: int) -> float:
  """Lock-step pipeline time for per-stage forward/backward op seconds (balance.py uses it)."""
  fwd, bwd = np.asarray(fwd, float), np.asarray(bwd, float)
  sched = _schedule(schedule, len(fwd), microbatches)
  cost = np.where(sched.op == schedules.FWD, fwd, np.where(sched.op == schedules.BWD, bwd, 0.0))
  return float(cost.max(axis=1).sum())


@dataclasses.dataclass
class Result:
  plan: Plan
  step_s: float
  tokens_per_s: float
  mfu: float
  memory: dict            # bytes per device by kind, and 'total'
  fits: bool
  breakdown: dict         # seconds by part (see simulate)
  bubble: float           # schedules.bubble_fraction with this plan's stage costs
  dp_bytes: float         # wire bytes each device sends per step for the data-parallel
                          # reduction (payload.py; local SGD: one reduction / local_steps)
  stage_layers: tuple
  events: list = dataclasses.field(default_factory=list)
  shares: tuple = ()      # batch shares: each replica's fraction of the batch; () = even

  def row(self) -> dict:
    p = self.plan
    return {"mesh": p.mesh, "schedule": p.schedule if p.pipe > 1 else "-",
            "microbatches": p.microbatches, "partition": list(self.stage_layers),
            "remat": p.remat, "zero": p.zero, "compression": p.compression_label(),
            # simulated only: the engine splits the batch evenly
            "batch_shares": p.batch_shares, "shares": list(self.shares),
            "step_s": self.step_s,
            "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
            "memory_gib": self.memory["total"] / 2**30, "fits": self.fits,
            "bubble": self.bubble, "dp_bytes": self.dp_bytes, "breakdown": self.breakdown}


def stage_local(plan: Plan) -> bool:
  """Whether each stage stores only its own blocks (in max(sizes) slots when uneven), as
  the trainer decides (config_check.stage_local)."""
  return plan.stage_local and plan.pipe > 1


def state_params(m: cm.ModelSpec, plan: Plan, sizes) -> dict:
  """Parameters one device holds, as rec_llm/parallel/sharding.state_rules lays state out:
  'params' (the parameters it stores), 'updated' (the share whose optimizer state it keeps
  and updates), 'replica' (its data replica's whole tensor shard: what a gradient or a
  gathered copy covers). Blocks: the stage's own when stage-local, else all; tensor splits
  heads, mlp and table rows; dp.zero splits 'embed' over data (1: optimizer state, 3: the
  parameters too)."""
  layers = max(sizes) if stage_local(plan) else m.num_layers
  count = lambda data: sum(math.prod(s) for s in arithmetic.param_shapes(
      m, plan.tensor, layers, data=data).values())
  replica = count(1)
  if plan.zero and plan.zero_flat:
    split = replica / plan.data
  else:
    split = count(plan.data if plan.zero else 1)
  return {"params": split if plan.zero == 3 else replica, "updated": split, "replica": replica}


def memory(m: cm.ModelSpec, batch: Batch, c: Cluster, plan: Plan, sizes,
           share: float | None = None) -> dict:
  """Bytes per device (the most loaded stage; SPMD gives every stage the same buffers).
  share: the replica's fraction of the global batch (batch shares); None: an even one."""
  t, p = plan.tensor, plan.pipe
  held = state_params(m, plan, sizes)
  width = max(sizes)
  rows = batch.global_batch // (plan.data * plan.microbatches)
  if share is not None:
    rows = batch.global_batch * share / plan.microbatches
  n = rows * batch.seq_len
  act_tok = cm.block_activation_bytes(dataclasses.replace(m, max_len=batch.seq_len), t,
                                      plan.sequence_parallel, scores=not plan.selective)
  one_block = n * act_tok
  if plan.remat:  # keep block inputs; one block's activations live during its backward
    per_mb = width * n * m.d_model * m.act_bytes
    transient = one_block
  else:
    per_mb, transient = width * one_block, 0.0
  # Gradients: the replica's whole shard (FSDP: its shard, and one block's whole gradient and
  # gathered weights at a time); a pipeline that is not stage-local also holds its stage's
  # block gradients before they are gathered over pipe.
  block = arithmetic.block_params(m, t)
  grads = held["replica"] if plan.zero < 3 else held["params"] + 2 * block
  if p > 1 and not stage_local(plan):
    grads += width * block
  out = {"params": 4 * held["params"], "grads": 4 * grads, "adam": 8 * held["updated"],
         "error_feedback": (4 * held["replica"] if plan.compression in payload.ERROR_FEEDBACK
                            and plan.data > 1 else 0.0)}
  if p > 1:
    sched = _schedule(plan.schedule, p, plan.microbatches)
    out["activations"] = sched.in_flight * per_mb + transient
    out["pipeline_buffers"] = (sched.act_slots + max(sched.grad_slots, sched.in_flight)) * \
        n * m.d_model * m.act_bytes
  else:
    out["activations"] = per_mb + transient
    out["pipeline_buffers"] = 0.0
  out["head"] = cm.head_transient_bytes(m, t, n)
  out["total"] = float(sum(out.values()))
  return out


# ---- the data-parallel reduction ----

def uses_dp_step(plan: Plan) -> bool:
  """True where the trainer runs the explicit data-parallel step (rec_llm/train/dp_step.py:
  compression, another aggregator or an asynchronous mode) instead of GSPMD's all-reduce."""
  return plan.compression != "none" or plan.aggregator != "psum" or plan.dp_mode != "sync"


def dp_reductions(m: cm.ModelSpec, plan: Plan, width: int, group: int) -> list:
  """The means (payload.Reduction) of one data-parallel reduction, on the gradient leaves one
  device holds, as the compiled HLO shows them (tests/test_sim_bytes.py):
  - GSPMD's step: every leaf all-reduced once (the item table's lookup and head gradients
    are summed first: vocab_parallel.tie); with pipe > 1, the stage's `width` stacked blocks
    and the shared leaves (summed over the stages first);
  - the explicit step (pipe = 1): the summed tree, compressed once. With pipe > 1, which it
    does not run, it is priced on the pipeline's leaves;
  - dp.zero: GSPMD's step reduce-scatters the leaves split over data (all-reduces the few it
    keeps whole), and all-gathers parameters: 1, every split leaf once, after the update;
    3 (FSDP), every split leaf before its forward use, and those the backward multiplies
    by (arithmetic.multiplies) again before their backward use."""
  if plan.data == 1:
    return []
  layers = width if plan.pipe > 1 else m.num_layers
  whole = arithmetic.param_shapes(m, plan.tensor, layers)
  shapes, total = list(whole.values()), sum(math.prod(s) for s in whole.values())
  if uses_dp_step(plan):
    out = payload.reductions(plan.compression, shapes, replicas=plan.data,
                             aggregator=plan.aggregator, ratio=plan.ratio, bits=plan.bits,
                             rank=plan.rank, group=group)
  else:
    out = [payload.Reduction("psum", total)]
  if not plan.zero:
    return out
  if plan.zero_flat:  # every leaf split over data
    split = {p: math.prod(s) for p, s in whole.items()}
  else:
    sharded = arithmetic.param_shapes(m, plan.tensor, layers, data=plan.data)
    split = {p: math.prod(s) for p, s in whole.items() if s != sharded[p]}
  if not uses_dp_step(plan):
    kept = total - sum(split.values())
    out = [payload.Reduction("reduce_scatter", total - kept), payload.Reduction("psum", kept)]
  gathered = sum(split.values()) + (plan.zero == 3) * sum(
      n for p, n in split.items() if arithmetic.multiplies(p))
  return out + [payload.Reduction("all_gather", gathered)]


def dp_time(c: Cluster, reductions: list, groups: dict, group: int) -> float:
  """Seconds of one data-parallel reduction: its means one after another."""
  n, level, _ = groups["data"]
  t = 0.0
  for r in reductions:
    if r.aggregator == "psum":
      t += collective_time(c, "all-reduce", 4 * r.numel, n, level)
    elif r.aggregator in payload.HALVES:  # ZeRO's reduce-scatter and all-gather
      t += collective_time(c, r.aggregator.replace("_", "-"), 4 * r.numel, n, level)
    elif r.aggregator == "sparse":  # every device gathers every other's pairs
      t += collective_time(c, "all-gather", n * r.numel * r.pair_bytes, n, level)
    else:  # rings of collective-permutes; hierarchical's first ring stays inside a node
      rings = payload.ring_hops(r.aggregator, n, r.numel, group=group, codec=r.codec)
      for i, (hops, nbytes, _) in enumerate(rings):
        lvl = "intra" if r.aggregator == "hierarchical" and i == 0 else level
        t += hops * collective_time(c, "collective-permute", nbytes, 2, lvl)
  return t


def _data_parallel(m: cm.ModelSpec, c: Cluster, plan: Plan, width: int,
                   groups: dict) -> tuple[float, float, float]:
  """(seconds of one reduction, one device's compression seconds, wire bytes per step)."""
  if plan.data == 1:
    return 0.0, 0.0, 0.0
  group = data_group(c, plan)
  reductions = dp_reductions(m, plan, width, group)
  wire = sum(r.wire_bytes(plan.data, group) for r in reductions)
  dp = dp_time(c, reductions, groups, group)
  if groups["data"][1] == "inter":
    # Each data-parallel collective across nodes is also a meeting of the processes
    # (inter_sync_s, fitted): GSPMD reduces each block's gradients and the shared ones
    # separately inside the backward (pipe = 1); the pipeline, its two sums once.
    dp += c.inter_sync_s * ((m.num_layers + 2) if plan.pipe == 1 else 2)
  comp_s = 0.0
  if plan.compression != "none":
    layers = width if plan.pipe > 1 else m.num_layers
    shapes = arithmetic.param_shapes(m, plan.tensor, layers).values()
    comp_s = cm.compression_time(c, shapes, plan.compression, plan.rank)
    if plan.aggregator == "sparse":  # scatter-add the n - 1 gathered payloads
      comp_s += cm.elementwise_time(c, 2 * wire)
  every = plan.local_steps if plan.dp_mode == "local_sgd" else 1
  return dp, comp_s, wire / every


def _exposed_dp(c: Cluster, plan: Plan, dp: float, window: float, compute: float,
                forward: float = 0.0) -> float:
  """What of one reduction (dp seconds) stays on the critical path. 'sync': GSPMD's step
  (pipe = 1) reduces each layer's gradients inside the backward loop, so the blocks'
  backward (`window`) hides it, and under ZeRO-3 each block's gather is prefetched behind
  the previous block's forward too (`forward`); the explicit step reduces after the
  backward and a pipeline after its schedule: nothing to hide behind. 'stale': the next
  steps' compute hides it. 'local_sgd': a blocking average of the parameters every H steps."""
  if plan.dp_mode == "sync":
    hidden = window + (forward if plan.zero == 3 else 0.0)
    hidden = hidden if plan.pipe == 1 and not uses_dp_step(plan) else 0.0
    return max(0.0, dp - c.overlap * hidden)
  if plan.dp_mode == "stale":
    return max(0.0, dp - c.overlap * compute)
  return dp / plan.local_steps


def straggler_factor(sigma: float, devices: int, averaged_steps: int = 1) -> float:
  """Expected slowdown of a step that waits for the slowest of `devices` lognormal(0, sigma)
  devices: exp(sigma_eff * sqrt(2 ln N)), the Gaussian extreme-value approximation, with
  sigma_eff = sigma / sqrt(steps) when a device may lag over `averaged_steps` steps."""
  if sigma <= 0 or devices <= 1:
    return 1.0
  return math.exp(sigma / math.sqrt(averaged_steps) * math.sqrt(2 * math.log(devices)))


def _replica_kinds(c: Cluster, plan: Plan, m: cm.ModelSpec):
  """(distinct rows of replica_stage_speeds, each replica's row index, replicas per row):
  replicas with the same stage speeds take the same time, so each kind is simulated once."""
  rows, inverse, counts = np.unique(replica_stage_speeds(c, plan, m), axis=0,
                                    return_inverse=True, return_counts=True)
  return rows, inverse.reshape(-1), counts


def _slowest_replica(sched: schedules.Schedule, costs: StageCosts, c: Cluster, plan: Plan,
                     m: cm.ModelSpec):
  """(pipeline seconds, tick seconds, tick compute, per-op compute, stage speeds, shares)
  of the slowest data replica (with batch shares: of every replica, all finishing
  together; its speeds then scaled to match)."""
  rows, inverse, counts = _replica_kinds(c, plan, m)
  per_replica = []
  for row in rows:
    ticks, tick_comp, comp = _tick_times(sched, costs, row, c, plan.data * plan.tensor)
    per_replica.append((float(ticks.sum()), ticks, tick_comp, comp, row))
  slowest = max(per_replica, key=lambda x: x[0])
  times = [r[0] for r in per_replica]
  k = _shares_factor(plan, times, counts, slowest[0])
  return (slowest[0] * k, slowest[1] * k, slowest[2] * k, slowest[3] * k, slowest[4] / k,
          _replica_shares(plan, times, inverse))


def _shares_factor(plan: Plan, times, counts, slowest: float) -> float:
  """With Plan.batch_shares, each replica's rows in proportion to 1 / its time at an even
  share: all take data / sum(1 / time), this factor of the slowest one's (work is taken as
  linear in the rows)."""
  if not plan.batch_shares:
    return 1.0
  return float(sum(counts) / sum(n / t for t, n in zip(times, counts)) / slowest)


def _replica_shares(plan: Plan, times, inverse) -> tuple:
  """With Plan.batch_shares, each data replica's fraction of the global batch, as
  _shares_factor splits it (times: per replica kind at an even share; inverse: each
  replica's kind); () without."""
  if not plan.batch_shares:
    return ()
  w = 1.0 / np.asarray(times, float)[inverse]
  return tuple(float(x) for x in w / w.sum())


def _pipe_grads_time(m: cm.ModelSpec, c: Cluster, plan: Plan, width: int, groups: dict,
                     local: bool) -> float:
  """Seconds to sum the shared gradients over pipe and, unless stages are stage-local,
  gather the stages' block gradients."""
  p, t = plan.pipe, plan.tensor
  if p == 1:
    return 0.0
  lvl = groups["pipe"][1]
  shared = collective_time(c, "all-reduce", 4 * arithmetic.shared_params(m, t), p, lvl)
  if local:  # each stage keeps (and updates) its own blocks' gradients
    return shared
  return shared + collective_time(c, "all-gather", 4 * p * width * arithmetic.block_params(m, t),
                                  p, lvl)


def _async_replica(sched: schedules.Schedule, costs: StageCosts, c: Cluster, plan: Plan,
                   m: cm.ModelSpec):
  """(pipeline seconds, its compute, its tensor comm, bubble, stage speeds, shares) of the
  slowest replica when stages run their ops as soon as their inputs arrive (Plan.lockstep
  False); batch shares as in _slowest_replica."""
  ops_per_stage = plan.microbatches * plan.virtual
  rows, inverse, counts = _replica_kinds(c, plan, m)
  out = []
  for row in rows:
    f = costs.fwd / row + costs.tp_fwd + costs.tick_extra
    b = costs.bwd / row + costs.tp_bwd + costs.tick_extra
    total = schedules.async_seconds(sched, f, b, costs.p2p / 2)
    busy = ops_per_stage * (f + b)
    if plan.schedule == ZERO_BUBBLE:  # weight gradients fill (P-1) backwards' worth of bubble
      total = max(total - (len(f) - 1) * float(b.max()), float(busy.max()))
    out.append((total, float(ops_per_stage * ((costs.fwd + costs.bwd) / row).max()),
                float(ops_per_stage * (costs.tp_fwd + costs.tp_bwd).max()),
                float(1.0 - busy.sum() / (len(f) * total)), row))
  slowest = max(out, key=lambda x: x[0])
  times = [r[0] for r in out]
  k = _shares_factor(plan, times, counts, slowest[0])
  return (slowest[0] * k, slowest[1] * k, slowest[2] * k, slowest[3], slowest[4] / k,
          _replica_shares(plan, times, inverse))


def simulate(m: cm.ModelSpec, batch: Batch, c: Cluster, plan: Plan, timeline: bool = False) -> Result:
  """Predicts one step of `plan`. Breakdown (seconds): pipeline (ticks, bubbles included),
  compute / tensor_comm / pipe_p2p (their shares of it), bubble_s, pipe_grads (gradient
  gather over pipe), pipe_buffers (the in-flight residuals' memory traffic), dp_comm (one
  reduction), dp_exposed (what the mode and overlap leave on the critical path),
  compression, optimizer, straggler_s, overhead."""
  sizes = check_plan(m, batch, c, plan)
  p, width = plan.pipe, max(sizes)
  groups = axis_groups(c, plan)
  costs = stage_costs(m, batch, c, plan, sizes)
  # interleaved: the tick table of microbatches x virtual chunk-ops per stage
  sched = _schedule(plan.schedule, p, plan.microbatches * plan.virtual)
  mr = dataclasses.replace(m, max_len=batch.seq_len)  # (the roofline of this batch's width)
  if p > 1 and not plan.lockstep:
    pipe_s, compute_s, tp_s, bubble, row, shares = _async_replica(sched, costs, c, plan, mr)
    p2p_s = costs.p2p * plan.microbatches * plan.virtual  # one send each way per op
    ticks = tick_comp = None  # (no ticks to draw: the trace is of lock-step plans)
  else:
    pipe_s, ticks, tick_comp, _, row, shares = _slowest_replica(sched, costs, c, plan, mr)
    ops = sched.op
    bubble = schedules.bubble_fraction(sched, costs.fwd / row, costs.bwd / row)
    tp_s = float(np.where(ops == schedules.FWD, costs.tp_fwd,
                          np.where(ops == schedules.BWD, costs.tp_bwd, 0.0)).max(axis=1).sum())
    compute_s = float(tick_comp.sum())
    p2p_s = costs.p2p * sched.ticks if p > 1 else 0.0
  pipe_grads = _pipe_grads_time(m, c, plan, width, groups, stage_local(plan))
  dp, comp_s, dp_bytes = _data_parallel(m, c, plan, width, groups)
  n_dev = c.devices
  opt = cm.optimizer_time(c, state_params(m, plan, sizes)["updated"])
  if c.shared_host:  # every device's optimizer and compression run on the same cores
    g = cm.host_speedup(c, n_dev)
    opt, comp_s = max(opt * n_dev / g, opt), max(comp_s * n_dev / g, comp_s)
  # with batch shares the fastest replica holds the most rows
  mem = memory(m, batch, c, plan, sizes, max(shares) if plan.batch_shares else None)
  # The pipeline's in-flight residuals (ring buffers of activations; the backward re-reads
  # the weights, pipeline.BlockResiduals) are written and read outside the cache, once a
  # step: on a shared host all devices' add up.
  buffers_s = 0.0
  if p > 1:
    buffers_s = c.pipe_buffer_s_per_byte * mem["activations"] * (n_dev if c.shared_host else 1)
  compute_total = pipe_s + pipe_grads + buffers_s + opt + comp_s
  lag = {"stale": plan.staleness + 1, "local_sgd": plan.local_steps}.get(plan.dp_mode, 1)
  strag = straggler_factor(c.straggler_sigma, n_dev, lag)
  straggler_s = (strag - 1.0) * (compute_s + opt + comp_s)
  # the blocks' backward (the head's comes first, before any block gradient exists)
  window = float((costs.bwd[0] - costs.head) / row[0])
  forward = float(costs.fwd[0] / row[0])  # (like `window`: one microbatch's)
  dp_exposed = _exposed_dp(c, plan, dp, window, compute_total, forward)
  step = compute_total + straggler_s + dp_exposed + c.step_overhead
  tokens = batch.global_batch * batch.seq_len
  breakdown = {"pipeline": pipe_s, "compute": compute_s, "tensor_comm": tp_s, "pipe_p2p": p2p_s,
               "bubble_s": pipe_s * bubble if p > 1 else 0.0, "pipe_grads": pipe_grads,
               "pipe_buffers": buffers_s, "dp_comm": dp, "dp_exposed": dp_exposed,
               "compression": comp_s,
               "optimizer": opt, "straggler_s": straggler_s, "overhead": c.step_overhead}
  res = Result(plan=plan, step_s=step, tokens_per_s=tokens / step,
               mfu=(arithmetic.flops_per_token(m, batch.seq_len, m.negatives) * tokens
                    / (c.total_peak_flops * step)),
               memory=mem, fits=mem["total"] <= 0.9 * c.memory_bytes, breakdown=breakdown,
               bubble=bubble if p > 1 else 0.0, dp_bytes=dp_bytes, stage_layers=tuple(sizes),
               shares=shares)
  if timeline and plan.lockstep:  # (the trace draws lock-step ticks)
    res.events = _timeline(sched, costs, row, ticks, tick_comp, c, breakdown, plan)
  return res


# ---- Chrome trace ----

def _timeline(sched, costs, row, ticks, tick_comp, c, bd, plan) -> list[dict]:
  """Events (seconds) for one step of the slowest data replica: one track per stage and
  one per communication stream."""
  ev = []
  op = sched.op
  starts = np.concatenate([[0.0], np.cumsum(ticks)[:-1]])
  for k in range(sched.ticks):
    t0 = starts[k]
    for s in range(sched.stages):
      kind = int(op[k, s])
      if kind == schedules.IDLE:
        continue
      f = kind == schedules.FWD
      dur = tick_comp[k] if c.shared_host else (costs.fwd[s] if f else costs.bwd[s]) / row[s]
      name = ("F" if f else "B") + str(int(sched.mb[k, s]))
      ev.append(dict(name=name, track=f"stage {s}", ts=t0, dur=float(dur),
                     args={"microbatch": int(sched.mb[k, s]), "op": "forward" if f else "backward"}))
      tp = costs.tp_fwd[s] if f else costs.tp_bwd[s]
      if tp > 0:
        ev.append(dict(name="tensor all-reduce", track=f"tensor comm {s}", ts=t0 + dur, dur=float(tp)))
    if costs.p2p > 0:
      ev.append(dict(name="pipe send/recv", track="pipe p2p", ts=t0 + ticks[k] - costs.p2p,
                     dur=float(costs.p2p)))
  t = float(ticks.sum())
  if bd["pipe_grads"] > 0:
    ev.append(dict(name="stage grads gather", track="pipe p2p", ts=t, dur=bd["pipe_grads"]))
    t += bd["pipe_grads"]
  if bd["compression"] > 0:
    for s in range(sched.stages):
      ev.append(dict(name=f"compress ({plan.compression})", track=f"stage {s}", ts=t,
                     dur=bd["compression"]))
    t += bd["compression"]
  if bd["dp_comm"] > 0:
    hidden = bd["dp_comm"] - bd["dp_exposed"] if plan.dp_mode != "local_sgd" else 0.0
    ev.append(dict(name=f"data reduction ({plan.aggregator})", track="data comm",
                   ts=max(0.0, t - hidden), dur=bd["dp_comm"],
                   args={"exposed_s": bd["dp_exposed"], "mode": plan.dp_mode}))
    t += bd["dp_exposed"]
  for s in range(sched.stages):
    ev.append(dict(name="optimizer", track=f"stage {s}", ts=t, dur=bd["optimizer"]))
  return ev


def chrome_trace(result: Result) -> dict:
  """Perfetto / chrome://tracing JSON: {"traceEvents": [...]}, times in microseconds, one
  thread per stage ('compute' process) and per communication stream ('communication')."""
  tracks = sorted({e["track"] for e in result.events},
                  key=lambda s: (not s.startswith("stage"), s))
  tid = {name: i for i, name in enumerate(tracks)}
  pid = lambda name: 0 if name.startswith("stage") else 1
  out = [{"name": "process_name", "ph": "M", "pid": 0, "tid": 0, "args": {"name": "compute"}},
         {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "args": {"name": "communication"}}]
  out += [{"name": "thread_name", "ph": "M", "pid": pid(n), "tid": tid[n], "args": {"name": n}}
          for n in tracks]
  for e in result.events:
    out.append({"name": e["name"], "ph": "X", "ts": round(e["ts"] * 1e6, 3),
                "dur": round(max(e["dur"], 0.0) * 1e6, 3), "pid": pid(e["track"]),
                "tid": tid[e["track"]], "args": e.get("args", {})})
  return {"traceEvents": out, "displayTimeUnit": "ms",
          "otherData": {"plan": result.plan.mesh, "step_s": result.step_s}}
