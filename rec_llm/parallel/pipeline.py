"""Pipeline parallelism over the 'stage' mesh axis (GPipe / 1F1B), composed with data and tensor.

Knows no model: it runs three functions on pytrees,

  first(shared, mb) -> x           (stage 0: e.g. the embedding)
  layer(layer_params, x, mb) -> x  (one of the stacked blocks)
  last(shared, x, mb) -> (loss_sum, aux_sums)   (last stage: e.g. the head and loss)

where `mb` is a microbatch of the batch dict, `layers` holds the blocks stacked on a leading
[L, ...] dim (the canonical layout, so checkpoints do not depend on the pipeline) and
`shared` holds everything else.

Design (why):
- One `jax.shard_map` manual over the batch ('data') and stage ('pipe') axes, auto over
  'tensor'. Manual over stages: the schedule is explicit (ppermute between neighbours,
  per-stage control flow). Manual over data: each replica accumulates its gradients over
  all microbatches locally and they are all-reduced once per step; under GSPMD the
  reduction would be inserted inside the loop, once per microbatch. 'tensor' stays with
  GSPMD, so the Megatron sharding of the blocks and the vocab-parallel head are reused
  as they are.
- Stage-local blocks (`stage_local`): `layers` comes in as stage-major slots [P * S, ...]
  (`to_slots`: the canonical layout itself for even stages) split over the stages, so a stage
  holds (and updates) only its own blocks and their gradients never leave it. Otherwise
  every stage holds every block and gathers its own.
- Each stage gathers its own blocks into [max_stage_layers, ...] slots and runs the first
  `count` of them in a while loop (`count` is per stage, so traced), taking each block's
  `jax.vjp` and writing its residuals in place into a buffer, all but the block's own
  weights (the vjp keeps them as residuals; the backward re-reads them from the stage's
  blocks, so no in-flight microbatch holds a weight copy); the backward is a second
  while loop over the same slots, last first. A stage with fewer blocks pays nothing for the
  padding slots. (Differentiating a scan over all slots with a `lax.cond` per slot instead
  zero-fills the skipped slots' residuals: a padding slot then cost about 45% of a block
  on CPU, and non-uniform partitions were slower than the uniform one.)
- The schedule is a static tick table (rec_llm/parallel/schedules.py). At every tick each
  stage runs at most one op: a forward (its blocks' residuals stored in a ring buffer of
  `in_flight` slots) or a backward (the stored vjps applied to the gradient from the next
  stage). GPipe's table needs M slots, 1F1B's at most P: that is the memory difference. The
  ops' loops run zero iterations on ticks that are not theirs (under a cond, XLA would copy
  the residual buffers every tick).
  Every tick ends with two ppermutes (activations forward, gradients backward).
- The embedding runs only on stage 0 and the head only on the last stage (`control.run_if`
  on the stage index: they hold tensor-parallel collectives, which a `lax.cond` would leave
  unordered with the tick's others on XLA:CPU). The last stage keeps its output in its
  (otherwise unused) gradient slots and runs the head's forward and backward in the microbatch's backward tick, so its
  [mb, seq, vocab/tensor] logits are never stored, and a stage's forward tick is its
  blocks' forwards, its backward tick their backwards (plus the head on the last): what
  the balancer times.
"""

import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from rec_llm.parallel import control, schedules, sharding


@dataclasses.dataclass(frozen=True)
class StageFns:
  first: Callable[[Any, Any], jax.Array]
  layer: Callable[[Any, jax.Array, Any], jax.Array]
  last: Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]]


def stage_plan(sizes: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(counts [P], index [P, S] of canonical layer per slot, inverse [L] of flat slot per layer)."""
  width = max(sizes)
  index = np.zeros((len(sizes), width), np.int32)  # padded slots point at layer 0; never run
  inverse, start = [], 0
  for s, n in enumerate(sizes):
    index[s, :n] = np.arange(start, start + n)
    inverse += [s * width + j for j in range(n)]
    start += n
  return np.asarray(sizes, np.int32), index, np.asarray(inverse, np.int32)


def from_slots(stacked, sizes):
  """[P * width, ...] stage-major slots -> [L, ...] real layers (the canonical layout), by
  static slices (a gather with an index array would make GSPMD replicate the tensor-sharded
  dims)."""
  width = stacked.shape[0] // len(sizes)
  if all(n == width for n in sizes):
    return stacked
  return jnp.concatenate([stacked[s * width: s * width + n] for s, n in enumerate(sizes)])


def to_slots(stacked, sizes):
  """[L, ...] canonical layers -> [P * max(sizes), ...] stage-major slots, stage s's blocks
  first in its slots and zeros after: split evenly over the stages, each stage then holds
  exactly its own blocks (stage-local weights over uneven stages). The padding slots never
  run; their gradients are zero, so an optimizer step keeps them zero."""
  width = max(sizes)
  if all(n == width for n in sizes):
    return stacked
  parts, start = [], 0
  for n in sizes:
    parts.append(stacked[start:start + n])
    if n < width:
      parts.append(jnp.zeros((width - n,) + stacked.shape[1:], stacked.dtype))
    start += n
  return jnp.concatenate(parts)


def _tree_zeros(shapes):
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


class BlockResiduals(NamedTuple):
  """How a stage stores one block's vjp residuals: `treedef` of the pullback; `from_params`,
  per pullback leaf, the index of the block parameter leaf it is (a weight, which the
  backward re-reads from the stage's own blocks, so the buffers hold no weight copies) or
  -1; `stored`, the shapes of the other leaves, which the buffers hold."""
  treedef: Any
  from_params: tuple
  stored: list


def _param_index(leaves, p) -> tuple:
  params = jax.tree.leaves(p)
  return tuple(next((i for i, q in enumerate(params) if r is q), -1) for r in leaves)


def block_residuals(layer_fn, sp, x_shape, mb) -> BlockResiduals:
  """One block's BlockResiduals (traced abstractly)."""
  found = []

  def leaves():
    p = jax.tree.map(lambda a: a[0], sp)
    x = jnp.zeros(x_shape.shape, x_shape.dtype)
    out, tdef = jax.tree.flatten(jax.vjp(lambda p_, x_: layer_fn(p_, x_, mb), p, x)[1])
    found.append((tdef, _param_index(out, p)))
    return [r for r, k in zip(out, found[0][1]) if k < 0]
  stored = jax.eval_shape(leaves)
  return BlockResiduals(found[0][0], found[0][1], stored)


def blocks_forward(layer_fn, sp, x, mb, count, res, slot, from_params):
  """The stage's first `count` blocks of `sp` ([width, ...] slots) on x; each block's vjp
  residuals, but the weights (`from_params`, BlockResiduals), go to res[slot, j] (res:
  leaves [in_flight, width, ...]).

  `count` is traced (it is per stage), so this is a while loop: the padding slots of a
  stage shorter than the longest cost nothing, forward or backward, and the residuals are
  written in place (a scan over all slots with a cond would zero-fill the skipped slots'
  residuals and make every stage pay for the longest).
  """
  def body(j, carry):
    x, res = carry
    p = jax.tree.map(lambda a: a[j], sp)
    y, vjp_fn = jax.vjp(lambda p_, x_: layer_fn(p_, x_, mb), p, x)
    leaves = jax.tree.leaves(vjp_fn)
    if _param_index(leaves, p) != from_params:  # at trace time: the layout must not drift
      raise AssertionError("a block's vjp residuals changed between traces")
    kept = [r for r, k in zip(leaves, from_params) if k < 0]
    return y, [b.at[slot, j].set(r) for b, r in zip(res, kept)]
  return lax.fori_loop(0, count, body, (x, res))


def blocks_backward(br: BlockResiduals, sp, res, slot, count, dy, g_sp):
  """Backward of `blocks_forward` from its stored residuals and the blocks' own weights,
  last block first: (dx, g_sp with each block's gradient added at its slot)."""
  def body(k, carry):
    dy, g_sp = carry
    j = count - 1 - k
    weights = jax.tree.leaves(jax.tree.map(lambda a: a[j], sp))
    stored = iter([b[slot, j] for b in res])
    leaves = [weights[i] if i >= 0 else next(stored) for i in br.from_params]
    g_p, dx = jax.tree.unflatten(br.treedef, leaves)(dy)
    return dx, jax.tree.map(lambda acc, g: acc.at[j].add(g), g_sp, g_p)
  return lax.fori_loop(0, count, body, (dy, g_sp))


def embed_backward(fns, shared, mb, dx, g_sh):
  """g_sh plus the embedding's parameter gradient for the stage-0 input gradient dx (the
  embedding is re-run: it is a lookup, cheaper to redo than to store)."""
  g = jax.vjp(lambda sh: fns.first(sh, mb), shared)[1](dx)[0]
  return jax.tree.map(jnp.add, g_sh, g)


def head_value_and_grad(fns: StageFns):
  """(shared, x, mb) -> ((loss_sum, aux), (g_shared, dx)) of the last stage's head."""
  return jax.value_and_grad(fns.last, argnums=(0, 1), has_aux=True)


@dataclasses.dataclass(frozen=True)
class Stage:
  """What one stage's ticks share: constant over the schedule (inside the shard_map)."""
  fns: StageFns
  layer_fn: Callable
  residuals: BlockResiduals  # how one block's vjp residuals are stored
  shared: Any               # shared parameters (embedding, head)
  sp: Any                   # this stage's blocks, [width, ...] slots
  mbatch: Any               # the replica's batch as [microbatches, rows, ...]
  count: jax.Array          # blocks this stage runs (traced: per stage)
  stage: jax.Array          # this stage's index
  nstages: int
  scale: jax.Array
  sched: schedules.Schedule
  axis: str                 # the mesh axis of the stages

  @property
  def k_grad(self) -> int:  # the last stage parks its outputs in its gradient slots
    return max(self.sched.grad_slots, self.sched.in_flight)


class Carry(NamedTuple):
  """A stage's state between ticks."""
  res: list          # per stored residual leaf: [in_flight, width, ...] of its blocks
  act: jax.Array     # [act_slots, rows, seq, d] activations received, not yet consumed
  grad: jax.Array    # [k_grad, rows, seq, d] gradients received (last stage: its outputs)
  g_sp: Any          # gradients of the stage's block slots
  g_sh: Any          # gradients of the shared parameters
  loss: jax.Array    # scale * the loss sums of the microbatches done
  aux: Any           # their aux sums


def init_carry(st: Stage, x_shape, res_shape, aux_shape) -> Carry:
  s = st.sched
  width = (jax.tree.leaves(st.sp)[0].shape[0],)
  return Carry(
      # Uninitialised: a slot is read only after the forward of its microbatch wrote it.
      res=[lax.empty((s.in_flight,) + width + r.shape, r.dtype) for r in res_shape],
      act=jnp.zeros((s.act_slots,) + x_shape.shape, x_shape.dtype),
      grad=jnp.zeros((st.k_grad,) + x_shape.shape, x_shape.dtype),
      g_sp=jax.tree.map(jnp.zeros_like, st.sp), g_sh=jax.tree.map(jnp.zeros_like, st.shared),
      loss=jnp.zeros((), jnp.float32), aux=_tree_zeros(aux_shape))


def _forward_op(st: Stage, c: Carry, fwd, i, mb) -> tuple[jax.Array, Carry]:
  """This tick's forward (zero blocks when it is not one): (output, carry). The last stage
  sends nothing: it parks its output in its gradient slot until the microbatch's backward."""
  is_first, is_last = st.stage == 0, st.stage == st.nstages - 1
  x = control.run_if(is_first & fwd, lambda _: st.fns.first(st.shared, mb),
                     c.act[i % st.sched.act_slots])
  y, res = blocks_forward(st.layer_fn, st.sp, x, mb, jnp.where(fwd, st.count, 0), c.res,
                          i % st.sched.in_flight, st.residuals.from_params)
  y = jnp.where(fwd, y, 0)
  g = i % st.k_grad
  grad = c.grad.at[g].set(jnp.where(is_last & fwd, y, c.grad[g]))
  return y, c._replace(res=res, grad=grad)


def _head_op(st: Stage, c: Carry, bwd, i, mb) -> tuple[jax.Array, Carry]:
  """The last stage's head, forward and backward, in its backward tick (so no [mb, seq,
  vocab] logits are ever stored): (the gradient entering the blocks' backward, carry)."""
  g = i % st.k_grad

  def head(c):
    (loss, aux), (g_sh, dy) = head_value_and_grad(st.fns)(st.shared, c.grad[g], mb)
    return ((dy * st.scale).astype(dy.dtype),
            c._replace(g_sh=jax.tree.map(lambda a, g: a + g * st.scale, c.g_sh, g_sh),
                       loss=c.loss + loss * st.scale, aux=jax.tree.map(jnp.add, c.aux, aux)))
  return control.run_if((st.stage == st.nstages - 1) & bwd, lambda gc: head(gc[1]),
                        (c.grad[g], c))


def _backward_op(st: Stage, c: Carry, bwd, i, mb, dy) -> tuple[jax.Array, Carry]:
  """This tick's backward (zero blocks when it is not one): (input gradient, carry)."""
  dx, g_sp = blocks_backward(st.residuals, st.sp, c.res, i % st.sched.in_flight,
                             jnp.where(bwd, st.count, 0), dy, c.g_sp)
  dx = jnp.where(bwd, dx, 0)
  g_sh = control.run_if((st.stage == 0) & bwd,
                        lambda g: embed_backward(st.fns, st.shared, mb, dx, g), c.g_sh)
  return dx, c._replace(g_sp=g_sp, g_sh=g_sh)


def _exchange(st: Stage, c: Carry, op_row, mb_row, y, dx) -> Carry:
  """Lock-step neighbours: every stage sends every tick (zeros when it had nothing); what
  arrives is kept in the slot of its microbatch."""
  n, stage = st.nstages, st.stage
  recv_y = lax.ppermute(y, st.axis, [(s, s + 1) for s in range(n - 1)])
  recv_dx = lax.ppermute(dx, st.axis, [(s + 1, s) for s in range(n - 1)])
  prev, nxt = jnp.maximum(stage - 1, 0), jnp.minimum(stage + 1, n - 1)
  got_y = (stage > 0) & (op_row[prev] == schedules.FWD)
  got_dx = (stage < n - 1) & (op_row[nxt] == schedules.BWD)
  ya, dxa = mb_row[prev] % st.sched.act_slots, mb_row[nxt] % st.k_grad
  return c._replace(act=c.act.at[ya].set(jnp.where(got_y, recv_y, c.act[ya])),
                    grad=c.grad.at[dxa].set(jnp.where(got_dx, recv_dx, c.grad[dxa])))


def tick(st: Stage, c: Carry, row) -> Carry:
  """One tick of the schedule on one stage: at most one op, then the exchange.

  The blocks' loops run `count` iterations on a tick with their op and none otherwise,
  rather than sit under a cond: a cond would pass the residual buffers through and XLA
  copies them, every tick.
  """
  op_row, mb_row = row
  op, i = op_row[st.stage], mb_row[st.stage]
  mb = jax.tree.map(lambda a: a[i], st.mbatch)
  fwd, bwd = op == schedules.FWD, op == schedules.BWD
  y, c = _forward_op(st, c, fwd, i, mb)
  dy, c = _head_op(st, c, bwd, i, mb)
  dx, c = _backward_op(st, c, bwd, i, mb, dy)
  return _exchange(st, c, op_row, mb_row, y, dx)


def _stage_loop(fns, layer_fn, sched, index, counts, layers, shared, batch, scale, *, baxis,
                paxis, nstages, stage_local):
  """Inside the shard_map (manual over data and stages): one replica's stage runs the
  schedule; returns its loss, aux sums and gradients, reduced over data (and the shared
  ones over stages)."""
  m = sched.microbatches
  stage = lax.axis_index(paxis)
  mbatch = jax.tree.map(lambda a: a.reshape((m, a.shape[0] // m) + a.shape[1:]), batch)
  # Stage-local: `layers` is already this stage's blocks; else every stage's, gathered here.
  sp = layers if stage_local else jax.tree.map(
      lambda a: jnp.take(a, jnp.asarray(index)[stage], axis=0), layers)
  mb0 = jax.tree.map(lambda a: a[0], mbatch)
  x_shape = jax.eval_shape(fns.first, shared, mb0)
  head_shape = jax.eval_shape(head_value_and_grad(fns), shared,
                              jnp.zeros(x_shape.shape, x_shape.dtype), mb0)
  br = block_residuals(layer_fn, sp, x_shape, mb0)
  st = Stage(fns, layer_fn, br, shared, sp, mbatch, jnp.asarray(counts)[stage], stage,
             nstages, scale, sched, paxis)
  c, _ = lax.scan(lambda c, row: (tick(st, c, row), None),
                  init_carry(st, x_shape, br.stored, head_shape[0][1]),
                  (jnp.asarray(sched.op), jnp.asarray(sched.mb)))
  # One data-parallel reduction per step, then the shared params (used by the first and
  # last stages) summed over stages.
  g_sp, g_sh = lax.psum((c.g_sp, c.g_sh), baxis)
  g_sh = lax.psum(g_sh, paxis)
  loss, aux = lax.psum((c.loss, c.aux), (baxis, paxis))
  return (loss, aux), (g_sp, g_sh)


def value_and_grad(fns: StageFns, layers, shared, batch: dict, scale: jax.Array, *, mesh: Mesh,
                   schedule: str, microbatches: int, stage_layers: tuple[int, ...],
                   remat: bool = False, layer_shardings=None, stage_local: bool = False):
  """Pipelined loss and gradients.

  Args:
    fns: the stage functions.
    layers, shared: parameters (see the module docstring); `layers` leaves are [L, ...].
    batch: dict of [batch, ...] arrays sharded over the batch axis.
    scale: a replicated scalar; the loss is scale * sum of `last`'s loss_sum over the batch.
    mesh: the mesh; the stage axis must have len(stage_layers) devices.
    schedule: 'gpipe' or '1f1b'.
    microbatches: microbatches per data replica (must divide its rows).
    stage_layers: blocks per stage (sum L, each >= 1).
    remat: recompute each block's activations in the backward.
    layer_shardings: optional shardings of `layers` (a pytree like it) for its gradients.
    stage_local: `layers` (and its gradients) are stage-major slots (`to_slots`) split over
      the stages: each stage reads only its own blocks, and their gradients stay there.

  Returns:
    (loss, aux_sums), (grad_layers, grad_shared), replicated over data; grad_layers in
    `layers`' layout ([L, ...], or the slots split over stages when `stage_local`).
  """
  baxis, paxis = sharding.mesh_axis("batch"), sharding.mesh_axis("stage")
  nstages = mesh.shape[paxis]
  counts, index, _ = stage_plan(tuple(stage_layers))
  if len(counts) != nstages:
    raise ValueError(f"{len(counts)} stage sizes for {nstages} stages")
  loop = functools.partial(
      _stage_loop, fns, jax.checkpoint(fns.layer) if remat else fns.layer,
      schedules.build(schedule, nstages, microbatches), index, counts,
      baxis=baxis, paxis=paxis, nstages=nstages, stage_local=stage_local)

  def manual_loop(*args):
    with sharding.manual((baxis, paxis)):
      return loop(*args)

  batch_spec = jax.tree.map(lambda _: P(baxis), batch)
  # The stage-major block gradients leave the shard_map split over stages; GSPMD gathers
  # them into the replicated [L, ...] layout while keeping their tensor sharding (a manual
  # all_gather inside would first replicate them over 'tensor').
  (loss, aux), (g_slots, g_shared) = jax.shard_map(
      manual_loop, mesh=mesh, in_specs=(P(paxis) if stage_local else P(), P(), batch_spec, P()),
      out_specs=((P(), P()), (P(paxis), P())), axis_names={baxis, paxis},
      check_vma=False)(layers, shared, batch, scale)
  if layer_shardings is not None:
    # Gather the (padded) gradient slots here, once, into the parameters' layout; left free,
    # GSPMD runs the optimizer split over stages and gathers params and both Adam moments.
    g_slots = lax.with_sharding_constraint(g_slots, layer_shardings)
  g_layers = g_slots if stage_local else jax.tree.map(lambda g: from_slots(g, counts), g_slots)
  if layer_shardings is not None:
    g_layers = lax.with_sharding_constraint(g_layers, layer_shardings)
  return (loss, aux), (g_layers, g_shared)


def stage_programs(fns: StageFns, shared, mb, stage_layers, remat: bool = False):
  """One stage's forward tick and backward tick for one microbatch as programs on one
  device, built from a pipeline tick's own code (for timing them: rec_llm/train/adaptive.py).

  Returns (fwd, bwd): fwd(layers, shared, stage) -> (y, residuals) is the embedding
  (stage 0) and the stage's blocks; bwd(layers, shared, stage, y, residuals) is, on the last
  stage, the head's forward and backward, then the blocks' backward from the stored
  residuals and the embedding's (stage 0).
  """
  layer_fn = jax.checkpoint(fns.layer) if remat else fns.layer
  head_vg = head_value_and_grad(fns)
  x0 = jax.eval_shape(fns.first, shared, mb)
  zeros_x = jnp.zeros(x0.shape, x0.dtype)
  head_shape = jax.eval_shape(head_vg, shared, zeros_x, mb)
  counts, index, _ = stage_plan(tuple(stage_layers))
  last = len(counts) - 1

  def slots(layers, stage):
    sp = jax.tree.map(lambda a: jnp.take(a, jnp.asarray(index)[stage], axis=0), layers)
    return sp, jnp.asarray(counts)[stage], block_residuals(layer_fn, sp, x0, mb)

  @jax.jit
  def fwd(layers, shared, stage):
    sp, count, br = slots(layers, stage)
    res = [lax.empty((1, index.shape[1]) + r.shape, r.dtype) for r in br.stored]
    x = lax.cond(stage == 0, lambda: fns.first(shared, mb), lambda: zeros_x)
    return blocks_forward(layer_fn, sp, x, mb, count, res, 0, br.from_params)

  @jax.jit
  def bwd(layers, shared, stage, y, res):
    sp, count, br = slots(layers, stage)
    (_, _), (g_sh, dy) = lax.cond(stage == last, lambda: head_vg(shared, y, mb),
                                  lambda: _tree_zeros(head_shape))
    dy = jnp.where(stage == last, dy, 1.0)
    dx, g_sp = blocks_backward(br, sp, res, 0, count, dy, jax.tree.map(jnp.zeros_like, sp))
    return g_sp, lax.cond(stage == 0, lambda: embed_backward(fns, shared, mb, dx, g_sh),
                          lambda: g_sh)
  return fwd, bwd
