"""A sweep config -> the list of points it names, each a flat JSON-able dict with a stable key.

A sweep config (experiments/configs/sweeps/*.py) has `name`, `defaults` and `groups`: each
group is a dict of the keys below (missing ones come from `defaults`, then from GROUP_KEYS);
list values are axes and a group's points are their cross product.

  name            the group's name; experiments/paper_tables.py picks its tables by it
  config          the run config file (e.g. experiments/configs/large_1b.py)
  overrides       nested dict merged into that config, e.g. {"data": {"num_items": 200000}}
  sources         'simulated' (rec_llm.sim on cluster presets) and/or 'measured' (trained here)
  clusters        presets for simulated points (rec_llm.sim.cluster.PRESETS)
  devices         resize the preset to these device counts (None: the preset's own)
  rows_per_device global batch = this x devices (weak scaling); None: the config's batch
  meshes          'DxTxP', or 'dp' | 'tp' | 'pp' (all devices on one axis), or 'hybrid'
                  (the planner's best plan with at least two axes > 1) or 'best' (its best
                  plan of any shape); named meshes get the planner's best schedule,
                  microbatches, partition and remat; 'hybrid' and 'best' only simulated
  schedules       for pipe > 1: 'gpipe' | '1f1b'; None: the config's (named: planner's choice)
  microbatches    for pipe > 1; None: the config's (named: planner's choice)
  compressions    'none' | 'int8' | 'topk' | 'powersgd' | ...; 'any': the planner picks
  aggregators     None: the planner's pairing (named) or 'sparse' for topk else 'psum'
  dp_modes        'sync' | 'stale' | 'local_sgd', with `staleness` and `local_steps`
  steps           measured: training steps (timings skip the first)
  quality         measured: evaluate the held-out split at the end
  trace           simulated: write the step's Chrome trace to traces/KEY.json

Combinations that mean nothing are dropped, not errors: compression or a DP mode other than
sync without data parallelism (data = 1), and, for measured points, with pipe > 1 (the
trainer's dp step needs pipe = 1).
"""

import hashlib
import importlib.util
import itertools
import json
import os
import re

from ml_collections import ConfigDict

from experiments.provenance import ROOT
from rec_llm.errors import ConfigError
from rec_llm.parallel.payload import DP_MODES, KINDS
from rec_llm.parallel.schedules import SCHEDULES

SOURCES = ("simulated", "measured")
NAMED_MESHES = ("dp", "tp", "pp", "hybrid", "best")
PLANNED = ("hybrid", "best")
GROUP_KEYS = dict(
    name=None, config="experiments/configs/default.py", overrides={}, sources=("simulated",),
    clusters=("h100x128",), devices=(None,), rows_per_device=(None,), meshes=("hybrid",),
    schedules=(None,), microbatches=(None,), compressions=("none",), aggregators=(None,),
    dp_modes=("sync",), staleness=1, local_steps=4, steps=3, quality=False, trace=True)
AXES = ("sources", "clusters", "devices", "rows_per_device", "meshes", "schedules",
        "microbatches", "compressions", "aggregators", "dp_modes")
_MESH = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def _plain(v):
  """ConfigDicts, tuples and lists -> dicts and lists (JSON's shapes)."""
  if isinstance(v, ConfigDict):
    v = v.to_dict()
  if isinstance(v, dict):
    return {str(k): _plain(x) for k, x in v.items()}
  if isinstance(v, (list, tuple)):
    return [_plain(x) for x in v]
  return v


def key(point: dict) -> str:
  """Stable across runs and machines: a hash of the point's canonical JSON."""
  blob = json.dumps(_plain(point), sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(blob.encode()).hexdigest()[:16]


def resolve_path(path: str) -> str:
  """A config path as given, or relative to the repository root."""
  if os.path.exists(path):
    return path
  alt = os.path.join(ROOT, path)
  return alt if os.path.exists(alt) else path


def load_config_file(path: str, arg: str | None = None) -> ConfigDict:
  """`get_config(arg)` of a Python config file (as config_flags loads it)."""
  full = resolve_path(path)
  if not os.path.isfile(full):
    raise ConfigError(f"config file {path!r} does not exist (paths are relative to the "
                      "working directory or the repository root)")
  spec = importlib.util.spec_from_file_location("_sweep_run_config", full)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # a config that does not even import: say which and why
    raise ConfigError(f"config file {path!r} failed to load: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config()")
  return module.get_config(arg) if arg is not None else module.get_config()


def apply_overrides(config: ConfigDict, overrides: dict, where: str = "") -> None:
  """Merges a nested dict into `config`; an unknown key or a wrong type is a ConfigError."""
  for k, v in overrides.items():
    name = f"{where}{k}"
    if k not in config:
      raise ConfigError(f"override {name!r}: the run config has no such key")
    if isinstance(v, dict):
      if not isinstance(config[k], ConfigDict):
        raise ConfigError(f"override {name!r}: {name} is a value, not a section")
      apply_overrides(config[k], v, name + ".")
      continue
    try:
      config[k] = tuple(v) if isinstance(v, list) else v
    except (TypeError, ValueError) as e:
      raise ConfigError(f"override {name}={v!r}: {e}") from None


def parse_mesh(spec: str, devices: int | None = None) -> tuple[int, int, int] | None:
  """'DxTxP' -> (d, t, p); 'dp' / 'tp' / 'pp' -> all `devices` on that axis; else None."""
  m = _MESH.match(spec)
  if m:
    return tuple(int(x) for x in m.groups())
  if spec in ("dp", "tp", "pp") and devices:
    shape = [1, 1, 1]
    shape[("dp", "tp", "pp").index(spec)] = devices
    return tuple(shape)
  return None


def _axis(group: dict, name: str) -> list:
  v = group[name]
  return list(v) if isinstance(v, (list, tuple)) else [v]


def _check_group(g: dict, i: int) -> None:
  where = f"group {i} ({g.get('name')!r})"
  unknown = sorted(set(g) - set(GROUP_KEYS))
  if unknown:
    raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(GROUP_KEYS)}")
  if not isinstance(g["name"], str) or not g["name"]:
    raise ConfigError(f"group {i}: needs a 'name' (the tables select rows by it)")
  from rec_llm.sim import cluster as cluster_lib
  for s in _axis(g, "sources"):
    if s not in SOURCES:
      raise ConfigError(f"{where}: source {s!r} is unknown; choose from {list(SOURCES)}")
  if "simulated" in _axis(g, "sources"):
    for c in _axis(g, "clusters"):
      if c not in cluster_lib.PRESETS:
        raise ConfigError(f"{where}: cluster {c!r} is unknown; choose from "
                          f"{list(cluster_lib.PRESETS)}")
  for n in _axis(g, "devices") + _axis(g, "rows_per_device"):
    if n is not None and (not isinstance(n, int) or n < 1):
      raise ConfigError(f"{where}: devices and rows_per_device must be positive integers or "
                        f"None, got {n!r}")
  for spec in _axis(g, "meshes"):
    if not isinstance(spec, str) or (spec not in NAMED_MESHES and not _MESH.match(spec)):
      raise ConfigError(f"{where}: mesh {spec!r} is not 'DxTxP' (e.g. '4x2x1') or one of "
                        f"{list(NAMED_MESHES)}")
    if spec in PLANNED and "measured" in _axis(g, "sources"):
      raise ConfigError(f"{where}: mesh {spec!r} is chosen by the planner and exists only for "
                        "simulated points; give measured points a 'DxTxP' mesh")
  for s in _axis(g, "schedules"):
    if s is not None and s not in SCHEDULES:
      raise ConfigError(f"{where}: schedule {s!r} is unknown; choose from {list(SCHEDULES)}")
  for k in _axis(g, "compressions"):
    if k != "any" and k not in KINDS:
      raise ConfigError(f"{where}: compression {k!r} is unknown; choose from "
                        f"{list(KINDS) + ['any']}")
  if "any" in _axis(g, "compressions") and "measured" in _axis(g, "sources"):
    raise ConfigError(f"{where}: compression 'any' lets the planner choose, so only simulated "
                      "points can use it; list the kinds for measured points")
  for mode in _axis(g, "dp_modes"):
    if mode not in DP_MODES:
      raise ConfigError(f"{where}: dp mode {mode!r} is unknown; choose from {list(DP_MODES)}")
  for k in ("steps", "staleness", "local_steps"):
    if not isinstance(g[k], int) or g[k] < (2 if k == "steps" else 0):
      raise ConfigError(f"{where}: {k}={g[k]!r} must be an integer >= {2 if k == 'steps' else 0} "
                        "(steps: the first is not timed)")
  if not isinstance(g["overrides"], dict):
    raise ConfigError(f"{where}: overrides must be a nested dict, e.g. "
                      "{'train': {'batch_size': 64}}")


def expand(sweep: ConfigDict) -> list[dict]:
  """The sweep's points, in order, duplicates removed. Raises ConfigError on bad input."""
  if not isinstance(sweep, ConfigDict) or "groups" not in sweep:
    raise ConfigError("a sweep config needs `groups` (a list of dicts) and a `name`; see "
                      "experiments/configs/sweeps/local_small.py")
  name = sweep.get("name", "sweep")
  defaults = {**GROUP_KEYS, **_plain(sweep.get("defaults", {}))}
  groups = sweep.groups
  if not isinstance(groups, (list, tuple)) or not groups:
    raise ConfigError("sweep config `groups` must be a non-empty list of dicts")
  points, seen = [], set()
  base_configs = {}
  for i, raw in enumerate(groups):
    if not isinstance(raw, dict):
      raise ConfigError(f"group {i} is a {type(raw).__name__}, not a dict")
    g = {**defaults, **_plain(raw)}
    _check_group(g, i)
    path = g["config"]
    if path not in base_configs:
      base_configs[path] = load_config_file(path)
    base = base_configs[path].copy_and_resolve_references()
    apply_overrides(base, g["overrides"])
    for combo in itertools.product(*(_axis(g, a) for a in AXES)):
      p = dict(zip(AXES, combo))
      p = normalise(g, p, base, name)
      if p is None:
        continue
      k = key(p)
      if k not in seen:
        seen.add(k)
        points.append({**p, "key": k})
  return points


def normalise(g: dict, axes: dict, base: ConfigDict, sweep_name: str) -> dict | None:
  """One point as a flat dict, or None where the combination means nothing."""
  source = axes["sources"]
  simulated = source == "simulated"
  cluster = axes["clusters"] if simulated else None
  devices = axes["devices"]
  mesh = axes["meshes"]
  shape = parse_mesh(mesh, devices)
  data = shape[0] if shape else (None if mesh in PLANNED else 1)
  pipe = shape[2] if shape else (1 if mesh in ("dp", "tp") else None)
  if mesh == "dp":
    data = devices or "all"  # every device: data parallel whatever the count
  comp, mode = axes["compressions"], axes["dp_modes"]
  if data == 1 and (comp != "none" or mode != "sync" or axes["aggregators"] is not None):
    return None
  if not simulated and pipe and pipe > 1 and (comp != "none" or mode != "sync"):
    return None
  schedule, micro = axes["schedules"], axes["microbatches"]
  if pipe == 1:
    schedule, micro = None, None  # meaningless without a pipeline
  return {
      "sweep": sweep_name, "group": g["name"], "source": source, "config": g["config"],
      "overrides": g["overrides"], "cluster": cluster, "devices": devices,
      "rows_per_device": axes["rows_per_device"], "mesh": mesh, "schedule": schedule,
      "microbatches": micro, "compression": comp, "aggregator": axes["aggregators"],
      "dp_mode": mode, "staleness": g["staleness"] if mode == "stale" else None,
      "local_steps": g["local_steps"] if mode == "local_sgd" else None,
      "steps": None if simulated else g["steps"],
      "quality": False if simulated else bool(g["quality"]),
      "trace": bool(g["trace"]) if simulated else False}


def run_config(point: dict, devices: int | None = None) -> ConfigDict:
  """The run config of a point: its file, its overrides, then the point's axes. `devices`:
  the device count the point runs on (fills named meshes and rows_per_device)."""
  c = load_config_file(point["config"])
  apply_overrides(c, point["overrides"])
  n = devices or point["devices"]
  shape = parse_mesh(point["mesh"], n)
  if shape:
    c.mesh.update(data=shape[0], tensor=shape[1], pipe=shape[2])
  if point["rows_per_device"] and n:
    c.train.batch_size = point["rows_per_device"] * n
  if point["schedule"]:
    c.pipeline.schedule = point["schedule"]
  if point["microbatches"]:
    c.pipeline.microbatches = point["microbatches"]
  if "dp" in c:
    if point["compression"] not in ("none", "any"):
      c.dp.compression.kind = point["compression"]
      c.dp.aggregator = point["aggregator"] or ("sparse" if point["compression"] == "topk" else "psum")
    elif point["aggregator"]:
      c.dp.aggregator = point["aggregator"]
    c.dp.mode = point["dp_mode"]
    if point["dp_mode"] == "stale":
      c.dp.staleness = point["staleness"]
    if point["dp_mode"] == "local_sgd":
      c.dp.local_steps = point["local_steps"]
  if point["steps"]:
    steps = point["steps"]
    c.train.update(steps=steps, log_every=1, warmup_steps=min(c.train.warmup_steps, steps))
    if "checkpoint" in c:
      c.checkpoint.every_steps = 0
    if "eval" in c:
      if point["quality"]:
        c.eval.every_steps = 0  # only at the end
      else:
        del c["eval"]
    if "balance" in c:
      c.balance.adaptive = False
  return c
