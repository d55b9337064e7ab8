"""Bytes moved by collectives, read from a compiled (SPMD-partitioned) HLO module.

`collective_bytes(compiled.as_text(), mesh)` walks the module from ENTRY, multiplying by the
known trip count of every enclosing while loop, and attributes each collective to the mesh
axes its replica groups (or source/target pairs) span.

Counting conventions (per device, per step):
- payload = the full buffer the collective produces or reduces on one device: the result
  size for all-reduce, all-gather, collective-permute and all-to-all; the operand size
  (result x group size) for reduce-scatter. Wire traffic of a ring algorithm is
  2(n-1)/n x payload for all-reduce and (n-1)/n x payload for all-gather / reduce-scatter.
- A collective inside a conditional branch is counted every time its conditional runs
  ("as if taken"): static HLO cannot know which branch runs. Pipelines therefore report an
  upper bound for collectives inside their per-tick branches (see the README formulas).
- A while loop in the named scope `at_most(n)` counts n times, as if it ran them all: the
  full softmax's chunk loops (rec_llm/parallel/vocab_parallel.py, which skip the chunks of
  padding), and AT_MOST_ONCE (rec_llm/parallel/control.run_if: a conditional written as a
  loop of zero or one trips), as if taken.
- Any other while loop without a known trip count (a loop bounded by a traced value, such
  as a pipeline stage's block loop) counts `unknown_trip_count` times if the caller gives it
  (an upper bound such as the longest stage's block count), else it is an error.
"""

import collections
import dataclasses
import json
import math
import re

import numpy as np



def at_most(trips: int) -> str:
  """The named scope of a while loop of at most `trips` trips (counted as that many)."""
  return f"at_most_{trips}_trips"


AT_MOST_ONCE = at_most(1)  # control.run_if's 0/1-trip loop
KINDS = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all")
_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
          "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->.*\{\s*$")
_INST = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$")
_ARRAY = re.compile(r"([a-z]+\d*)\[([\d,]*)\]")


@dataclasses.dataclass
class Collective:
  kind: str
  axes: str          # '+'-joined mesh axes the groups span ('' if none)
  payload: int       # bytes per execution, per device
  count: int         # executions per step (product of enclosing trip counts)
  name: str
  group: int = 1     # devices per replica group (2 for a collective-permute pair)

  @property
  def wire(self) -> float:
    """Bytes one device sends per execution with ring algorithms (see the module docstring)."""
    n = max(self.group, 1)
    if self.kind == "all-reduce":
      return 2 * (n - 1) / n * self.payload
    if self.kind == "collective-permute":
      return float(self.payload)
    return (n - 1) / n * self.payload


def _shape_bytes(shape: str) -> int:
  total = 0
  for dt, dims in _ARRAY.findall(shape):
    if dt in _BYTES:
      total += _BYTES[dt] * math.prod(int(d) for d in dims.split(",") if d)
  return total


def _parse(text: str):
  comps, entry, cur = {}, None, None
  for line in text.splitlines():
    m = _COMP.match(line)
    if m:
      cur = m.group(1)
      comps[cur] = []
      if line.startswith("ENTRY"):
        entry = cur
      continue
    if cur is None:
      continue
    if line.strip() == "}":
      cur = None
      continue
    m = _INST.match(line)
    if m:
      comps[cur].append((m.group(1), m.group(2), m.group(3), m.group(4)))
  return comps, entry


def _groups(attrs: str) -> list[list[int]] | None:
  m = re.search(r"replica_groups=\{(\{[\d,\s]*\}(?:\s*,\s*\{[\d,\s]*\})*)\}", attrs)
  if m:
    return [[int(x) for x in g.split(",") if x.strip()]
            for g in re.findall(r"\{([\d,\s]*)\}", m.group(1))]
  m = re.search(r"replica_groups=\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", attrs)
  if m:  # iota: arange(prod(reshape)).reshape(reshape).transpose(T).reshape(groups)
    shape = [int(x) for x in m.group(1).split(",")]
    ids = np.arange(math.prod(shape)).reshape([int(x) for x in m.group(2).split(",")])
    if m.group(3):
      ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    return ids.reshape(shape).tolist()
  m = re.search(r"replica_groups=mesh\[([^\]]*)\],?\s*(?:device_ids=\(\[([\d,]+)\]"
                r"(?:T\(([\d,]+)\))?\)\s*)?\{([^}]*)\}", attrs)
  if m:  # named: devices laid out on these axes, grouped over the listed ones
    names = re.findall(r"'(\w+)'=(\d+)", m.group(1))
    over = re.findall(r"'(\w+)'", m.group(4))
    dims = [int(n) for _, n in names]
    ids = np.arange(math.prod(dims))
    if m.group(2):  # devices in iota order [shape] transposed by T
      ids = ids.reshape([int(x) for x in m.group(2).split(",")])
      if m.group(3):
        ids = ids.transpose([int(x) for x in m.group(3).split(",")])
    ids = ids.reshape(dims)
    idx = [i for i, (a, _) in enumerate(names) if a in over]
    rest = [i for i in range(len(dims)) if i not in idx]
    return ids.transpose(rest + idx).reshape(-1, math.prod(dims[i] for i in idx) or 1).tolist()
  return None


def _axes_of(groups: list[list[int]], mesh_shape: dict[str, int]) -> str:
  names, dims = list(mesh_shape), list(mesh_shape.values())
  varying = set()
  for g in groups:
    coords = np.array([np.unravel_index(i, dims) for i in g])
    varying |= {names[k] for k in range(len(dims)) if len(set(coords[:, k])) > 1}
  return "+".join(n for n in names if n in varying)


def collectives(text: str, mesh_shape: dict[str, int],
                unknown_trip_count: int | None = None) -> list[Collective]:
  """Every collective reachable from ENTRY, with its payload, count and mesh axes."""
  comps, entry = _parse(text)
  out = []

  def visit(comp, mult, seen):
    if comp not in comps or comp in seen:
      return
    for name, shape, op, rest in comps[comp]:
      base = op[:-6] if op.endswith("-start") else op
      if base in KINDS:
        if base == "collective-permute":
          pairs = re.search(r"source_target_pairs=\{(.*?)\}\}", rest)
          groups = [[int(a), int(b)] for a, b in re.findall(r"\{(\d+),(\d+)", pairs.group(0))] \
              if pairs else []
        else:
          groups = _groups(rest) or []
        payload = _shape_bytes(shape)
        if op.endswith("-start"):  # async: result tuple holds operand and result buffers
          payload //= 2
        if base == "reduce-scatter":
          payload *= max(len(groups[0]), 1) if groups else 1
        out.append(Collective(base, _axes_of(groups, mesh_shape), payload, mult, name,
                              max((len(g) for g in groups), default=1)))
      if op == "while":
        trip = (re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                or re.search(r"/at_most_(\d+)_trips/", rest))
        if trip is None and unknown_trip_count is None:
          raise ValueError(f"while loop {name} has no known trip count; pass "
                           "unknown_trip_count (an upper bound) to count its collectives")
        body = re.search(r"body=%?([\w.\-]+)", rest).group(1)
        n = int(trip.group(1)) if trip else int(unknown_trip_count)
        visit(body, mult * n, seen | {comp})
      elif op == "conditional":
        m = re.search(r"branch_computations=\{([^}]*)\}", rest)
        branches = re.findall(r"%?([\w.\-]+)", m.group(1)) if m else re.findall(
            r"(?:true|false)_computation=%?([\w.\-]+)", rest)
        for b in branches:  # "as if taken": see the module docstring
          visit(b, mult, seen | {comp})
      else:
        for callee in re.findall(r"(?:to_apply|calls)=%?([\w.\-]+)", rest):
          visit(callee, mult, seen | {comp})

  visit(entry, 1, frozenset())
  return out


def collective_bytes(text: str, mesh_shape: dict[str, int],
                     unknown_trip_count: int | None = None) -> dict:
  """{'by_kind': {kind: bytes}, 'by_axis': {axes: bytes}, 'by_axis_kind': {axes: {kind: bytes}},
  'total': bytes, 'wire_by_axis': {axes: bytes}}: payload bytes per device per step, and
  the bytes each device sends with ring algorithms (see the module docstring)."""
  by_kind, by_axis, wire = collections.Counter(), collections.Counter(), collections.Counter()
  by_axis_kind = collections.defaultdict(collections.Counter)
  for c in collectives(text, mesh_shape, unknown_trip_count):
    b = c.payload * c.count
    by_kind[c.kind] += b
    by_axis[c.axes] += b
    wire[c.axes] += c.wire * c.count
    by_axis_kind[c.axes][c.kind] += b
  return json.loads(json.dumps({
      "by_kind": {k: by_kind.get(k, 0) for k in KINDS}, "by_axis": dict(by_axis),
      "by_axis_kind": {a: dict(v) for a, v in by_axis_kind.items()},
      "total": sum(by_kind.values()), "wire_by_axis": dict(wire)}))
