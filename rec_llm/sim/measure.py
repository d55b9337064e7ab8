"""Microbenchmarks on the current devices -> a calibration dict (JSON) for the cost model.

Measured (each the median of `repeats` timed runs after a warm-up):
- `matmul_flops`: a float32 n^3 matmul on one device, its fastest run (the peak the cost
  model scales by and MFU divides by);
  `memory_bandwidth`: an element-wise pass over 32 MiB; `memory_bandwidth_all_devices`:
  the same on every device at once (what virtual devices sharing a host get together).
- `components`: forward and backward of one block, forward + backward of the embedding and
  of the item head (final norm + vocab-parallel softmax cross-entropy + loss), on one
  device, for several row counts and for each tensor split's shard (see `components`);
  on CPU also `components["busy"]`, the same with every device busy at once, per device
  (virtual devices sharing the host's cores: what a tick of a real step costs there).
- `host_speedup_measured`: the model on every device at once vs one device after another
  (virtual CPU devices share the host's cores), to check cost_model.host_speedup.
- `optimizer_s_per_param`: clip + AdamW + the non-finite guard on a flat parameter vector.
- `collectives`: all-reduce, all-gather, collective-permute and all-to-all over a mesh axis
  of 2, 4 and 8 devices, each device in a group (as in a training step), at a few payload
  sizes; least-squares fit `t = alpha + bytes / beta` per (kind, group). A collective runs
  R times inside one program and the time of 1 is subtracted, so dispatch is not counted.
  Payload bytes follow rec_llm/parallel/hlo_stats.py (the result per device).
- `call_overhead_s` (a scan step with a cond and a slot update, as the pipeline's tick) and
  `step_overhead_s` (dispatch + sync of a trivial program on all devices).
"""

import dataclasses
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rec_llm.models import seq_transformer as st

KINDS = ("all-reduce", "all-gather", "collective-permute", "all-to-all")


def time_call(fn, *args, repeats: int = 5, stat=np.median) -> float:
  """Seconds of fn(*args) after one warm-up call: `stat` (median) of `repeats` runs."""
  jax.block_until_ready(fn(*args))
  runs = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    runs.append(time.perf_counter() - t)
  return float(stat(runs))


def time_interleaved(calls, repeats: int) -> dict:
  """{key: [seconds of each round]} for `calls`, a list of (key, thunk) already warmed up:
  every thunk once per round, so a slow spell of the machine hits all of them alike."""
  runs = {key: [] for key, _ in calls}
  for _ in range(repeats):
    for key, call in calls:
      t = time.perf_counter()
      jax.block_until_ready(call())
      runs[key].append(time.perf_counter() - t)
  return runs


def fit_alpha_beta(nbytes, seconds) -> tuple[float, float]:
  """Least-squares t = alpha + bytes / beta in relative error (each point weighted by 1/t,
  so the small sizes, which set alpha, count as much as the large ones); alpha clamped at
  0 (then a fit through 0)."""
  b, t = np.asarray(nbytes, float), np.asarray(seconds, float)
  w = 1.0 / t
  (alpha, slope), *_ = np.linalg.lstsq(np.stack([w, b * w], 1), np.ones_like(t), rcond=None)
  if alpha < 0:
    alpha, slope = 0.0, float(np.median(t / b))
  slope = max(float(slope), 1e-15)
  return float(alpha), 1.0 / slope


def matmul_flops(device, n: int = 1024, repeats: int = 20) -> float:
  """A peak: the fastest of `repeats` runs (one slow run on a shared host would halve a
  median, and with it every MFU figure)."""
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  return 2.0 * n**3 / time_call(jax.jit(lambda x: x @ x), a, repeats=repeats, stat=min)


def memory_bandwidth(device, mib: int = 32, repeats: int = 7) -> float:
  """Bytes/s of an element-wise pass (read + write) over `mib` MiB on one device."""
  x = jax.device_put(jnp.ones((mib * 2**18,), jnp.float32), device)
  return 2 * x.nbytes / time_call(jax.jit(lambda x: x * 1.5 + 1.0), x, repeats=repeats)


def memory_bandwidth_all(devices=None, mib: int = 16, repeats: int = 7) -> float:
  """The same pass on every device at once (`mib` MiB each): the host's total bandwidth."""
  devices = list(devices or jax.devices())
  mesh = Mesh(np.asarray(devices), ("x",))
  x = _global_zeros((len(devices) * mib * 2**18,), NamedSharding(mesh, P("x")))
  f = jax.jit(jax.shard_map(lambda x: x * 1.5 + 1.0, mesh=mesh, in_specs=P("x"), out_specs=P("x")))
  return 2 * x.nbytes / time_call(f, x, repeats=repeats)


def _model_cfg(model: dict) -> st.ModelConfig:
  keys = ("num_items", "num_layers", "d_model", "num_heads", "mlp_dim", "max_len",
          "vocab_multiple", "dtype", "block")
  return st.ModelConfig(**{k: model[k] for k in keys if k in model})


def held_bytes(tree, device=None) -> int:
  """Bytes one device (default: the first) holds of a tree of arrays: its shards' sizes."""
  device = device or jax.devices()[0]
  return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
             if s.device == device)


def memory_of(compiled) -> dict:
  """Bytes from `compiled.memory_analysis()`; peak = arguments + outputs - aliases + temps
  ({} where the backend gives no analysis)."""
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {"argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes,
         "alias_bytes": m.alias_size_in_bytes, "temp_bytes": m.temp_size_in_bytes}
  out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
  return out


def _loss(cfg: st.ModelConfig):
  """The training loss of rec_llm/train/step.py (mean NLL + train hits), rebuilt here because
  rec_llm/sim does not import rec_llm/train."""
  from rec_llm.parallel import vocab_parallel
  model = st.SeqTransformer(cfg)

  def loss(params, ids, targets):
    hidden, table = model.apply({"params": params}, ids)
    nll_sum, rank = vocab_parallel.softmax_xent(hidden, table, targets, cfg.num_items + 1,
                                                total=True)
    mask = targets != 0
    count = jnp.maximum(mask.sum(), 1)
    return nll_sum / count, ((rank < 10) & mask).sum() / count

  return model, loss


def _fit_line(xs, ys):
  (a, b), *_ = np.linalg.lstsq(np.stack([np.ones(len(xs)), np.asarray(xs, float)], 1),
                               np.asarray(ys, float), rcond=None)
  return float(a), float(b)


@dataclasses.dataclass(frozen=True)
class _ShardConfig(st.ModelConfig):
  """One device's tensor shard of the model: heads / t of the full head size, mlp / t, the
  item table's rows / t (what a device computes under Megatron tensor parallelism)."""
  shard_head_dim: int = 0

  @property
  def head_dim(self) -> int:
    return self.shard_head_dim


def shard_config(cfg: st.ModelConfig, t: int) -> st.ModelConfig:
  if t == 1:
    return cfg
  return _ShardConfig(num_items=cfg.vocab_size // t - 1, num_layers=cfg.num_layers,
                      d_model=cfg.d_model, num_heads=cfg.num_heads // t, mlp_dim=cfg.mlp_dim // t,
                      max_len=cfg.max_len, vocab_multiple=1, dtype=cfg.dtype,
                      block=cfg.block, shard_head_dim=cfg.head_dim)


def _tables(seq_len: int, rest_block: dict, embed_share: float) -> dict:
  """Component tables from {rows: (rest, one block)} seconds of forward + backward: a
  block's forward : backward split is its FLOPs' 1 : 2; the rest is embedding and head in
  the ratio `embed_share`; every time at least 1 us."""
  out = {"block": {"tokens": [], "fwd_s": [], "bwd_s": []},
         "embed": {"tokens": [], "fwd_bwd_s": []}, "head": {"tokens": [], "fwd_bwd_s": []}}
  for r, (rest, blk) in rest_block.items():
    rest, blk = max(rest, 1e-6), max(blk, 1e-6)
    for k in ("block", "embed", "head"):
      out[k]["tokens"].append(r * seq_len)
    out["block"]["fwd_s"].append(blk / 3)
    out["block"]["bwd_s"].append(2 * blk / 3)
    out["embed"]["fwd_bwd_s"].append(rest * embed_share)
    out["head"]["fwd_bwd_s"].append(rest * (1 - embed_share))
  return out


def _component_tables(cfg, rows, depths, device, repeats):
  """See `components`; one tensor shard."""
  from rec_llm.parallel import vocab_parallel
  S, d = cfg.max_len, cfg.d_model
  key = jax.random.PRNGKey(0)
  put = lambda x: jax.device_put(x, device)
  per_depth = {}
  for depth in depths:
    net, loss = _loss(dataclasses.replace(cfg, num_layers=depth))
    params = put(nn.meta.unbox(net.init(key, jnp.ones((1, S), jnp.int32))["params"]))
    per_depth[depth] = (params, jax.jit(jax.value_and_grad(loss, has_aux=True)))
  shared = {"item_embedding": put(jax.random.normal(key, (cfg.vocab_size, d)) * 0.02),
            "pos_embedding": put(jnp.zeros((S, d))),
            "ln_final": put({"scale": jnp.ones((d,)), "bias": jnp.zeros((d,))})}

  def head_loss(sh, x, tgt):
    hidden, tbl = st.final_norm(cfg, sh, x)
    nll_sum, rank = vocab_parallel.softmax_xent(hidden, tbl, tgt, cfg.num_items + 1, total=True)
    return nll_sum + 0.0 * (rank < 10).sum()

  embed_fb = jax.jit(jax.grad(lambda sh, i: st.embed(cfg, sh, i).sum()))
  head_fb = jax.jit(jax.grad(head_loss, argnums=(0, 1)))
  points, parts = [], []
  for r in rows:
    ids = put(jax.random.randint(key, (r, S), 1, cfg.num_items + 1))
    for k in depths:
      points.append((r, k, time_call(per_depth[k][1], per_depth[k][0], ids, ids, repeats=repeats)))
    if r <= 16:  # only the ratio is used: small sizes suffice
      parts.append((time_call(embed_fb, shared, ids, repeats=repeats),
                    time_call(head_fb, shared, put(jnp.ones((r, S, d))), ids, repeats=repeats)))
  r_, k_, t_ = (np.asarray(x, float) for x in zip(*points))
  design = np.stack([np.ones_like(r_), r_, k_, k_ * r_], 1) / t_[:, None]
  (a0, a1, b0, b1), *_ = np.linalg.lstsq(design, np.ones_like(t_), rcond=None)
  embed_share = float(np.median([e / (e + h) for e, h in parts]))
  grid = sorted(set(rows) | {1, 2, 4, 8, 16, 32, 64})
  out = _tables(S, {r: (a0 + a1 * r, b0 + b1 * r) for r in grid}, embed_share)
  out["fit"] = {"formula": "t = a0 + a1*rows + depth*(b0 + b1*rows)",
                "a0": a0, "a1": a1, "b0": b0, "b1": b1, "embed_share_of_rest": embed_share,
                "rel_residual_rms": float(np.sqrt(np.mean((design @ [a0, a1, b0, b1] - 1) ** 2)))}
  out["points"] = {"rows": r_.tolist(), "depth": k_.tolist(), "fwd_bwd_s": t_.tolist(),
                   "embed_alone_s": [e for e, _ in parts], "head_alone_s": [h for _, h in parts]}
  return out


def components(model: dict, rows=(1, 4, 16, 64), depths=(1, 4), tensors=None, device=None,
               repeats: int = 5) -> dict:
  """Seconds of one block and of the embedding and head, forward + backward, on one device,
  per row count and per tensor split t (the device's shard: heads, mlp and table rows / t).

  Measured in place: the whole model's loss (of the shard), forward + backward, at every
  (rows, depth). One weighted least-squares fit over all of them (relative errors),
      t(rows, depth) = (a0 + a1 rows) + depth (b0 + b1 rows),
  gives a block's marginal cost (its scan step, slicing and residual stacking included) and
  the rest (embedding, final norm, head, loss); a fit over all points averages out the
  +-30% noise of single timings on a shared machine. The rest is split between embedding
  and head in the ratio of the two timed on their own; a block's forward : backward split
  is its FLOPs' 1 : 2.
  """
  cfg = _model_cfg(model)
  device = device or jax.devices()[0]
  if tensors is None:
    tensors = [t for t in (1, 2, 4, 8) if cfg.num_heads % t == 0 and cfg.mlp_dim % t == 0
               and cfg.vocab_size % t == 0 and t <= len(jax.devices())]
  tables = {str(t): _component_tables(shard_config(cfg, t), rows, depths, device, repeats)
            for t in tensors}
  out = {"tables": tables,
         "model": {k: getattr(cfg, k) for k in ("num_items", "num_layers", "d_model", "num_heads",
                                                 "mlp_dim", "max_len", "vocab_multiple", "dtype")}}
  if cfg.block != "transformer":  # (calibrations from before the field: transformer blocks)
    out["model"]["block"] = cfg.block
  return out


def all_devices_time(model: dict, rows: int, devices, repeats: int = 5) -> float:
  """Seconds for every device in `devices` (this process's) to run the model's forward +
  backward on its own `rows` rows at once: the host's throughput with all devices busy."""
  fn, args, mesh = _all_devices_call(_model_cfg(model), rows, devices)
  with jax.set_mesh(mesh):
    return time_call(fn, *args, repeats=repeats)


def _all_devices_call(cfg: st.ModelConfig, rows: int, devices):
  """(fn, args, mesh): every device's forward + backward of `cfg` on its own `rows` rows."""
  from rec_llm.parallel import sharding
  n, S = len(devices), cfg.max_len
  net, loss = _loss(cfg)
  params = nn.meta.unbox(net.init(jax.random.PRNGKey(0), jnp.ones((1, S), jnp.int32))["params"])
  grad = jax.value_and_grad(loss, has_aux=True)
  mesh = Mesh(np.asarray(devices).reshape(n, 1, 1), ("data", "tensor", "pipe"))

  def local(p, ids):
    with sharding.manual(("data", "tensor", "pipe")):
      (l, _), g = grad(p, ids, ids)
    return l[None], jax.tree.map(lambda a: a[None], g)

  many = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("data")),
                               out_specs=(P("data"), P("data")), check_vma=False))
  ids = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (rows * n, S), 1, cfg.num_items + 1))
  args = (jax.device_put(params, NamedSharding(mesh, P())),
          jax.device_put(ids, NamedSharding(mesh, P("data"))))
  return many, args, mesh


def busy_components(model: dict, rows=(1, 2, 4, 8, 16, 32), depths=(1, 2, 4), tensors=None,
                    devices=None, repeats: int = 5, embed_share: dict | None = None) -> dict:
  """Host seconds per device op with every device busy: the tables of `components`, but
  each point timed with all `devices` running the (shard's) model at once on their own
  rows, divided by the device count.

  On a host whose virtual devices share the cores, this is what a tick of a real step
  costs: the host is full, and the per-row cost depends on the op's size (a 2-row op's
  logits and activations stay in the shared cache; an 8-row op's do not: about 30% more
  per row on the project's machine), which single-device times measured alone do not
  show. Each point is the fastest of `repeats` rounds over all points of a tensor split
  (interleaved, so a slow spell of the machine does not bias one row count). Per row count,
  t(depth) = rest + depth * block by least squares over `depths`; the rest is split between
  embedding and head as `components` measured them alone (`embed_share`: per tensor split,
  its fit's embed_share_of_rest; else 3%).
  """
  cfg = _model_cfg(model)
  devices = list(devices or jax.devices())
  n = len(devices)
  if tensors is None:
    tensors = [t for t in (1, 2, 4) if cfg.num_heads % t == 0 and cfg.mlp_dim % t == 0
               and cfg.vocab_size % t == 0 and t <= n]
  out = {"devices": n, "tables": {}}
  for t in tensors:
    sc = shard_config(cfg, t)
    calls = {(r, k): _all_devices_call(dataclasses.replace(sc, num_layers=k), r, devices)
             for r in rows for k in depths}
    best = {key: np.inf for key in calls}
    for i in range(repeats):
      for key, (fn, args, mesh) in calls.items():
        with jax.set_mesh(mesh):
          if i == 0:
            jax.block_until_ready(fn(*args))  # compile and warm up
          t0 = time.perf_counter()
          jax.block_until_ready(fn(*args))
          best[key] = min(best[key], time.perf_counter() - t0)
    pts = {r: [(k, best[(r, k)] / n) for k in depths] for r in rows}
    tab = _tables(cfg.max_len, {r: _fit_line(*zip(*pts[r])) for r in rows},
                  (embed_share or {}).get(str(t), 0.03))
    tab["points"] = {str(r): [[k, s] for k, s in v] for r, v in pts.items()}
    out["tables"][str(t)] = tab
    del calls
  return out


def host_speedup(model: dict, rows: int = 8, devices=None, repeats: int = 5) -> dict:
  """len(devices) x (one device's model forward + backward) / (every device running it at
  once on its own rows). Virtual CPU devices share the host's cores; the cost model
  predicts this from the single-device times (cost_model.host_speedup); measured as a check."""
  cfg = _model_cfg(model)
  devices = list(devices or jax.devices())
  net, loss = _loss(cfg)
  params = nn.meta.unbox(net.init(jax.random.PRNGKey(0), jnp.ones((1, cfg.max_len), jnp.int32))["params"])
  ids = jax.device_put(np.ones((rows, cfg.max_len), np.int32), devices[0])
  t1 = time_call(jax.jit(jax.value_and_grad(loss, has_aux=True)),
                 jax.device_put(params, devices[0]), ids, ids, repeats=repeats)
  tn = all_devices_time(model, rows, devices, repeats)
  return {"rows": rows, "one_device_s": t1, "all_devices_s": tn, "speedup": len(devices) * t1 / tn}


def optimizer_s_per_param(device=None, params: int = 2**21, repeats: int = 5) -> float:
  import optax
  device = device or jax.devices()[0]
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.01))
  p = jax.device_put(jnp.ones((params,), jnp.float32), device)
  g = jax.device_put(jnp.full((params,), 1e-3, jnp.float32), device)
  state = tx.init(p)

  @jax.jit
  def update(p, g, state):
    ok = jnp.isfinite(optax.tree.norm(g))
    u, new_state = tx.update(g, state, p)
    new_p = optax.apply_updates(p, u)
    keep = lambda n, o: jax.tree.map(lambda a, b: jnp.where(ok, a, b), n, o)
    return keep(new_p, p), keep(new_state, state)

  return time_call(update, p, g, state, repeats=repeats) / params


def call_overhead(device=None, steps: int = 64, repeats: int = 5) -> float:
  """Seconds per dispatched op, from a scan whose step runs a cond and a slot update."""
  device = device or jax.devices()[0]

  def f(buf):
    def tick(b, i):
      v = lax.cond(i % 2 == 0, lambda: b[i % 4] + 1.0, lambda: b[i % 4] * 2.0)
      return b.at[i % 4].set(v), None
    return lax.scan(tick, buf, jnp.arange(steps))[0]

  t = time_call(jax.jit(f), jax.device_put(jnp.zeros((4, 8)), device), repeats=repeats)
  return t / steps / 3  # ~3 dispatches per step: the cond, its branch, the update


def step_overhead(devices=None, repeats: int = 9) -> float:
  """Dispatch + sync of a trivial program on all devices (across processes too)."""
  devices = list(devices or jax.devices())
  mesh = Mesh(np.asarray(devices), ("x",))
  x = _global_zeros((len(devices),), NamedSharding(mesh, P("x")))
  return time_call(jax.jit(lambda x: x + 1), x, repeats=repeats)


def _global_zeros(shape, sharding):
  return jax.make_array_from_callback(shape, sharding, lambda idx: np.zeros(
      [len(range(*s.indices(n))) for s, n in zip(idx, shape)], np.float32))


def collectives(devices=None, groups=(2, 4, 8), sizes=(2**16, 2**19, 2**22), kinds=KINDS,
                level: str = "intra", reps: int = 8, repeats: int = 5, grid=None) -> list[dict]:
  """Fits per (kind, group size) over `devices` arranged as [len/g, g] (or `grid`: a dict
  group -> device array whose last axis is the group).

  Every device is in some group and all groups run at once, as in a training step.
  """
  devices = list(devices or jax.devices())
  out = []
  for g in groups:
    arr = np.asarray(devices).reshape(-1, g) if grid is None else grid[g]
    if arr.shape[-1] != g:
      continue
    mesh = Mesh(arr, ("o", "x"))
    spec = P(("o", "x"))
    sharding = NamedSharding(mesh, spec)
    for kind in kinds:
      times, nbytes = [], []
      for size in sizes:
        elems = size // 4 // (g if kind == "all-gather" else 1)
        x = _global_zeros((arr.size * elems,), sharding)

        def make(r, kind=kind, g=g, elems=elems):
          def one(x):
            if kind == "all-reduce":
              return lax.psum(x, "x")
            if kind == "all-gather":
              y = lax.all_gather(x, "x", tiled=True)
              return lax.dynamic_slice_in_dim(y, lax.axis_index("x") * elems, elems)
            if kind == "collective-permute":
              return lax.ppermute(x, "x", [(j, (j + 1) % g) for j in range(g)])
            return lax.all_to_all(x, "x", 0, 0, tiled=True)
          body = lambda x: lax.fori_loop(0, r, lambda i, x: one(x), x)
          return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec,
                                       check_vma=False))
        t1 = time_call(make(1), x, repeats=repeats)
        tr = time_call(make(reps + 1), x, repeats=repeats)
        times.append(max((tr - t1) / reps, 1e-7))
        nbytes.append(elems * 4 * (g if kind == "all-gather" else 1))
      alpha, beta = fit_alpha_beta(nbytes, times)
      out.append(dict(level=level, kind=kind, group=g, processes=jax.process_count(),
                      bytes=nbytes, times_s=times, alpha_s=alpha, beta_Bps=beta))
  return out


def calibrate(model: dict, rows=(1, 4, 16, 64), groups=(2, 4, 8),
              sizes=(2**16, 2**19, 2**22), repeats: int = 5) -> dict:
  """Every measurement above on this process's devices, as one JSON-able dict."""
  dev = jax.devices()[0]
  t0 = time.perf_counter()
  cal = {
      "kind": "rec_llm.sim calibration", "device_kind": dev.device_kind, "platform": dev.platform,
      "num_devices": jax.device_count(), "processes": jax.process_count(),
      "matmul_flops": matmul_flops(dev), "memory_bandwidth": memory_bandwidth(dev),
      "memory_bandwidth_all_devices": memory_bandwidth_all(),
      "components": components(model, rows, device=dev, repeats=repeats),
      "host_speedup_measured": host_speedup(model, repeats=repeats) if dev.platform == "cpu" else None,
      "optimizer_s_per_param": optimizer_s_per_param(dev, repeats=repeats),
      "call_overhead_s": call_overhead(dev, repeats=repeats),
      "step_overhead_s": step_overhead(),
      "collectives": collectives(groups=groups, sizes=sizes, repeats=repeats),
  }
  if dev.platform == "cpu":  # virtual devices sharing the host's cores
    share = {t: v["fit"]["embed_share_of_rest"] for t, v in cal["components"]["tables"].items()}
    cal["components"]["busy"] = busy_components(model, repeats=repeats, embed_share=share)
  try:
    import os
    cal["host_memory_bytes"] = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
  except (ValueError, OSError, AttributeError):
    pass
  cal["measure_s"] = time.perf_counter() - t0
  return cal
