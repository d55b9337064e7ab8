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
- Each stage gathers its own blocks into [max_stage_layers, ...] slots and scans over them
  with `lax.cond(slot < its count)`: a stage with fewer blocks skips the missing ones at run
  time (forward and backward) instead of computing and discarding them.
- The schedule is a static tick table (rec_llm/parallel/schedules.py). At every tick each
  stage runs at most one op: a forward (`jax.vjp` of the stage, its residuals stored in a ring
  buffer of `in_flight` slots) or a backward (the stored vjp applied to the gradient from the
  next stage). GPipe's table needs M slots, 1F1B's at most P: that is the memory difference.
  Every tick ends with two ppermutes (activations forward, gradients backward).
- The embedding runs only on stage 0 and the head only on the last stage (`lax.cond` on the
  stage index). The last stage runs the head's forward and backward in the same tick, so
  its [mb, seq, vocab/tensor] logits are never stored per microbatch; the gradient it
  yields waits in the stage's gradient slots for the blocks' backward.
- Stored per in-flight microbatch: the stage's vjp residuals, which include each slot's
  weights as the scan sliced them (a copy per microbatch; an inefficiency, not a bug).
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, PartitionSpec as P

from rec_llm.parallel import schedules, sharding


@dataclasses.dataclass(frozen=True)
class StageFns:
  first: Callable[[Any, Any], jax.Array]
  layer: Callable[[Any, jax.Array, Any], jax.Array]
  last: Callable[[Any, jax.Array, Any], tuple[jax.Array, Any]]


def stage_sizes(num_layers: int, stages: int, stage_layers=()) -> tuple[int, ...]:
  """Blocks per stage: `stage_layers` if given, else as even as possible (earlier stages +1)."""
  if stage_layers:
    return tuple(int(n) for n in stage_layers)
  q, r = divmod(num_layers, stages)
  return tuple(q + (s < r) for s in range(stages))


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


def _unpad(stacked, counts):
  """[P * width, ...] stage-major slots -> [L, ...] real layers, by static slices (a gather
  with an index array would make GSPMD replicate the tensor-sharded dims)."""
  width = stacked.shape[0] // len(counts)
  if all(n == width for n in counts):
    return stacked
  return jnp.concatenate([stacked[s * width: s * width + n] for s, n in enumerate(counts)])


def _tree_zeros(shapes):
  return jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)


def _run_stage(fns: StageFns, layer_fn, sp, shared, x_in, mb, stage, count):
  """Stage `stage`'s forward: the embedding if it is the first, then its `count` real blocks.

  The slots past `count` (padding up to the longest stage) are skipped by `lax.cond` at run
  time, so a short stage does no work, forward or backward, for blocks it does not have.
  """
  x = lax.cond(stage == 0, lambda: fns.first(shared, mb), lambda: x_in)
  width = jax.tree.leaves(sp)[0].shape[0]

  def slot(x, args):
    j, p = args
    return lax.cond(j < count, lambda: layer_fn(p, x, mb), lambda: x), None

  return lax.scan(slot, x, (jnp.arange(width), sp))[0]


def value_and_grad(fns: StageFns, layers, shared, batch: dict, scale: jax.Array, *, mesh: Mesh,
                   schedule: str, microbatches: int, stage_layers: tuple[int, ...],
                   remat: bool = False, layer_shardings=None):
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

  Returns:
    (loss, aux_sums), (grad_layers, grad_shared), all replicated over data and stages.
  """
  baxis, paxis = sharding.mesh_axis("batch"), sharding.mesh_axis("stage")
  nstages, m = mesh.shape[paxis], microbatches
  counts, index, _ = stage_plan(tuple(stage_layers))
  if len(counts) != nstages:
    raise ValueError(f"{len(counts)} stage sizes for {nstages} stages")
  sched = schedules.build(schedule, nstages, m)
  ops, mbs = jnp.asarray(sched.op), jnp.asarray(sched.mb)
  k_res, k_act, k_grad = sched.in_flight, sched.act_slots, sched.grad_slots
  layer_fn = jax.checkpoint(fns.layer) if remat else fns.layer
  head_vg = jax.value_and_grad(fns.last, argnums=(0, 1), has_aux=True)
  fwd_pairs = [(s, s + 1) for s in range(nstages - 1)]
  bwd_pairs = [(s + 1, s) for s in range(nstages - 1)]

  def body(layers, shared, batch, scale):
    stage = lax.axis_index(paxis)
    is_first, is_last = stage == 0, stage == nstages - 1
    mbatch = jax.tree.map(lambda a: a.reshape((m, a.shape[0] // m) + a.shape[1:]), batch)
    sp = jax.tree.map(lambda a: jnp.take(a, jnp.asarray(index)[stage], axis=0), layers)
    mb0 = jax.tree.map(lambda a: a[0], mbatch)
    x_shape = jax.eval_shape(fns.first, shared, mb0)
    zeros_x = lambda: jnp.zeros(x_shape.shape, x_shape.dtype)
    head_shape = jax.eval_shape(head_vg, shared, zeros_x(), mb0)

    def forward(mb, x_in):
      """This stage's blocks (after the embedding on stage 0) and their vjp."""
      return jax.vjp(lambda sp_, sh_, x_: _run_stage(fns, layer_fn, sp_, sh_, x_, mb, stage,
                                                      jnp.asarray(counts)[stage]),
                     sp, shared, x_in)

    treedef = []

    def res_shapes():
      leaves, tdef = jax.tree.flatten(forward(mb0, zeros_x())[1])
      treedef.append(tdef)
      return leaves
    res_shape = jax.eval_shape(res_shapes)

    k_grad = max(sched.grad_slots, sched.in_flight)  # the last stage parks its head gradients
    carry = dict(
        res=[jnp.zeros((k_res,) + r.shape, r.dtype) for r in res_shape],
        act=jnp.zeros((k_act,) + x_shape.shape, x_shape.dtype),
        grad=jnp.zeros((k_grad,) + x_shape.shape, x_shape.dtype),
        g_sp=jax.tree.map(jnp.zeros_like, sp), g_sh=jax.tree.map(jnp.zeros_like, shared),
        loss=jnp.zeros((), jnp.float32), aux=_tree_zeros(head_shape[0][1]))

    def tick(c, row):
      op_row, mb_row = row
      op, i = op_row[stage], mb_row[stage]
      mb = jax.tree.map(lambda a: a[i], mbatch)

      def do_fwd(c):
        y, vjp_fn = forward(mb, c["act"][i % k_act])
        res = [b.at[i % k_res].set(r) for b, r in zip(c["res"], jax.tree.leaves(vjp_fn))]
        # The last stage runs the head forward and backward at once: its gradient waits in
        # the stage's own (otherwise unused) gradient slots for the blocks' backward.
        (loss, aux), (g_sh, dy) = lax.cond(
            is_last, lambda: head_vg(shared, y, mb), lambda: _tree_zeros(head_shape))
        grad = c["grad"].at[i % k_grad].set(
            jnp.where(is_last, (dy * scale).astype(dy.dtype), c["grad"][i % k_grad]))
        g_sh = jax.tree.map(lambda a, g: a + g * scale, c["g_sh"], g_sh)
        return (res, grad, g_sh, y, c["loss"] + loss * scale,
                jax.tree.map(jnp.add, c["aux"], aux))

      c["res"], c["grad"], c["g_sh"], y, c["loss"], c["aux"] = lax.cond(
          op == schedules.FWD, do_fwd,
          lambda c: (c["res"], c["grad"], c["g_sh"], zeros_x(), c["loss"], c["aux"]), c)

      def do_bwd(c):
        vjp_fn = jax.tree.unflatten(treedef[0], [b[i % k_res] for b in c["res"]])
        g_sp, g_sh, dx = vjp_fn(c["grad"][i % k_grad])
        return (jax.tree.map(jnp.add, c["g_sp"], g_sp), jax.tree.map(jnp.add, c["g_sh"], g_sh),
                dx)

      c["g_sp"], c["g_sh"], dx = lax.cond(
          op == schedules.BWD, do_bwd, lambda c: (c["g_sp"], c["g_sh"], zeros_x()), c)
      # Lock-step neighbours: every stage sends every tick (zeros when it had nothing).
      recv_y = lax.ppermute(y, paxis, fwd_pairs)
      recv_dx = lax.ppermute(dx, paxis, bwd_pairs)
      prev = jnp.maximum(stage - 1, 0)
      nxt = jnp.minimum(stage + 1, nstages - 1)
      got_y = (stage > 0) & (op_row[prev] == schedules.FWD)
      got_dx = (stage < nstages - 1) & (op_row[nxt] == schedules.BWD)
      ya, dxa = mb_row[prev] % k_act, mb_row[nxt] % k_grad
      c["act"] = c["act"].at[ya].set(jnp.where(got_y, recv_y, c["act"][ya]))
      c["grad"] = c["grad"].at[dxa].set(jnp.where(got_dx, recv_dx, c["grad"][dxa]))
      return c, None

    c, _ = lax.scan(tick, carry, (ops, mbs))
    # One data-parallel reduction per step, then the shared params (used by the first and
    # last stages) summed over stages.
    g_sp, g_sh = lax.psum((c["g_sp"], c["g_sh"]), baxis)
    g_sh = lax.psum(g_sh, paxis)
    loss, aux = lax.psum((c["loss"], c["aux"]), (baxis, paxis))
    return (loss, aux), (g_sp, g_sh)

  def manual_body(*args):
    with sharding.manual((baxis, paxis)):
      return body(*args)

  batch_spec = jax.tree.map(lambda _: P(baxis), batch)
  # The stage-major block gradients leave the shard_map split over stages; GSPMD gathers
  # them into the replicated [L, ...] layout while keeping their tensor sharding (a manual
  # all_gather inside would first replicate them over 'tensor').
  (loss, aux), (g_slots, g_shared) = jax.shard_map(
      manual_body, mesh=mesh, in_specs=(P(), P(), batch_spec, P()),
      out_specs=((P(), P()), (P(paxis), P())), axis_names={baxis, paxis},
      check_vma=False)(layers, shared, batch, scale)
  if layer_shardings is not None:
    # Gather the (padded) gradient slots here, once, into the parameters' layout; left free,
    # GSPMD runs the optimizer split over stages and gathers params and both Adam moments.
    g_slots = lax.with_sharding_constraint(g_slots, layer_shardings)
  g_layers = jax.tree.map(lambda g: _unpad(g, counts), g_slots)
  if layer_shardings is not None:
    g_layers = lax.with_sharding_constraint(g_layers, layer_shardings)
  return (loss, aux), (g_layers, g_shared)


def measure_stage_times(fns: StageFns, layers, shared, mb, stage_layers: tuple[int, ...],
                        remat: bool = False, repeats: int = 5, stat=np.median) -> list[float]:
  """Seconds for each stage's forward + backward of one microbatch (`stat` of `repeats` runs;
  np.min suits a shared machine, where noise only ever adds time).

  Runs the same stage code as the pipeline (embedding on stage 0, the skipped padding slots,
  the head on the last stage) on one device, so the numbers show what a stage costs.
  """
  import time
  counts, index, _ = stage_plan(tuple(stage_layers))
  nstages = len(counts)
  layer_fn = jax.checkpoint(fns.layer) if remat else fns.layer
  x0 = jax.eval_shape(fns.first, shared, mb)

  @jax.jit
  def fwd_bwd(layers, shared, stage):
    sp = jax.tree.map(lambda a: jnp.take(a, jnp.asarray(index)[stage], axis=0), layers)

    def f(sp, shared):
      y = _run_stage(fns, layer_fn, sp, shared, jnp.zeros(x0.shape, x0.dtype), mb, stage,
                     jnp.asarray(counts)[stage])
      return lax.cond(stage == nstages - 1, lambda: fns.last(shared, y, mb)[0].astype(jnp.float32),
                      lambda: y.sum().astype(jnp.float32))
    return jax.grad(f, argnums=(0, 1))(sp, shared)

  for s in range(nstages):
    jax.block_until_ready(fwd_bwd(layers, shared, s))  # compile / warm up
  runs = [[] for _ in range(nstages)]
  for _ in range(repeats):  # stages interleaved: a burst of load on the host hits them alike
    for s in range(nstages):
      t = time.perf_counter()
      jax.block_until_ready(fwd_bwd(layers, shared, s))
      runs[s].append(time.perf_counter() - t)
  return [float(stat(r)) for r in runs]
