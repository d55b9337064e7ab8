"""Pipeline schedules as static tick tables, and their bubble fraction.

A schedule is simulated once on the host: every stage has an ordered list of forward (F)
and backward (B) microbatch ops, and at each tick a stage runs its next op as soon as the
op's input has arrived (sent by a neighbour at an earlier tick). The result is a table
[ticks, stages] that the SPMD pipeline loop indexes by tick and stage.

- 'gpipe': all forwards, then all backwards; a stage holds up to M microbatches.
- '1f1b' (PipeDream-flush): P-1-s warm-up forwards, then one forward / one backward, then
  the remaining backwards; stage s holds at most P-s microbatches (stage 0: P).
"""

import dataclasses

import numpy as np

IDLE, FWD, BWD = 0, 1, 2
SCHEDULES = ("gpipe", "1f1b")


def stage_sizes(num_layers: int, stages: int, stage_layers=()) -> tuple[int, ...]:
  """Blocks per stage: `stage_layers` if given, else as even as possible (earlier stages +1)."""
  if stage_layers:
    return tuple(int(n) for n in stage_layers)
  q, r = divmod(num_layers, stages)
  return tuple(q + (s < r) for s in range(stages))


@dataclasses.dataclass(frozen=True)
class Schedule:
  kind: str
  stages: int
  microbatches: int
  op: np.ndarray        # [ticks, stages]: IDLE / FWD / BWD
  mb: np.ndarray        # [ticks, stages]: the microbatch of that op (0 when idle)
  in_flight: int        # most microbatches any stage holds (forwarded, not yet backwarded)
  act_slots: int        # most activations a stage has received but not yet consumed
  grad_slots: int       # the same for incoming gradients

  @property
  def ticks(self) -> int:
    return self.op.shape[0]


def _order(kind: str, stages: int, stage: int, m: int) -> list[tuple[int, int]]:
  if kind == "gpipe":
    return [(FWD, i) for i in range(m)] + [(BWD, i) for i in range(m)]
  warm = min(stages - 1 - stage, m)
  ops = [(FWD, i) for i in range(warm)]
  for j in range(m - warm):
    ops += [(FWD, warm + j), (BWD, j)]
  return ops + [(BWD, i) for i in range(m - warm, m)]


def build(kind: str, stages: int, microbatches: int) -> Schedule:
  """Simulates the schedule (greedy, one op per stage per tick, one tick of link latency)."""
  if kind not in SCHEDULES:
    raise ValueError(f"unknown pipeline schedule {kind!r}; choose one of {list(SCHEDULES)}")
  p, m = stages, microbatches
  orders = [_order(kind, p, s, m) for s in range(p)]
  done = {}  # (op, stage, mb) -> tick it ran
  pos, ops, mbs = [0] * p, [], []
  t = 0
  while any(pos[s] < len(orders[s]) for s in range(p)):
    row_op, row_mb = [IDLE] * p, [0] * p
    for s in range(p):
      if pos[s] == len(orders[s]):
        continue
      op, i = orders[s][pos[s]]
      if op == FWD:
        dep = None if s == 0 else (FWD, s - 1, i)
      else:
        dep = (FWD, s, i) if s == p - 1 else (BWD, s + 1, i)
      if dep is None or done.get(dep, t) < t:
        row_op[s], row_mb[s] = op, i
    for s in range(p):
      if row_op[s] != IDLE:
        done[(row_op[s], s, row_mb[s])] = t
        pos[s] += 1
    ops.append(row_op)
    mbs.append(row_mb)
    t += 1
    if t > 4 * (m + p) + 8:
      raise AssertionError("schedule simulation did not finish")  # a bug, not a user error
  op, mb = np.asarray(ops, np.int32), np.asarray(mbs, np.int32)
  return Schedule(kind, p, m, op, mb, _max_live(op, mb, FWD, BWD, 0),
                  _max_live(op, mb, FWD, FWD, -1), _max_live(op, mb, BWD, BWD, +1))


def _max_live(op, mb, produce, consume, source):
  """Most items live at once per stage: produced by stage s+source, not yet consumed by s.

  Items are produced and consumed in microbatch order, so the live ones form a contiguous
  range and `mb % slots` never collides when slots >= this maximum.
  """
  ticks, p = op.shape
  best = 1
  for s in range(p):
    src = s + source
    if not 0 <= src < p:
      continue
    live = 0
    for t in range(ticks):
      live -= int(op[t, s] == consume)
      best = max(best, live)
      live += int(op[t, src] == produce)  # arrives after the tick: usable from t+1
      best = max(best, live)
  return best


def bubble_fraction(schedule: Schedule, fwd_cost=None, bwd_cost=None) -> float:
  """Idle share of stage-time: 1 - busy / (stages * elapsed).

  Stages run in lock-step ticks, so a tick lasts as long as its slowest op. `fwd_cost` and
  `bwd_cost` (per stage, default 1 and 2) give op durations; with equal costs for all
  stages GPipe and 1F1B both give (P-1)/(M+P-1) when bwd_cost = fwd_cost.
  """
  p = schedule.stages
  f = np.ones(p) if fwd_cost is None else np.asarray(fwd_cost, float)
  b = 2 * f if bwd_cost is None else np.asarray(bwd_cost, float)
  cost = np.where(schedule.op == FWD, f[None], np.where(schedule.op == BWD, b[None], 0.0))
  elapsed = cost.max(axis=1).sum()
  return float(1.0 - cost.sum() / (p * elapsed))


def analytic_bubble(stages: int, microbatches: int) -> float:
  """The textbook bubble of GPipe and 1F1B with uniform stages: (P-1)/(M+P-1)."""
  return (stages - 1) / (microbatches + stages - 1)


def async_seconds(schedule: Schedule, fwd_cost, bwd_cost, link_s: float = 0.0) -> float:
  """Makespan when each stage runs its ops in the schedule's order as soon as their input
  arrives (as Megatron-LM's pipeline does), not in lock-step ticks: a forward waits for the
  previous stage's forward of that microbatch, a backward for the next stage's backward (the
  last stage's, for its own forward), each plus `link_s`. With uniform stages this is
  (M + P - 1) (f + b) for 1F1B and GPipe: the textbook bubble (`analytic_bubble`)."""
  p = schedule.stages
  f, b = np.asarray(fwd_cost, float), np.asarray(bwd_cost, float)
  free = np.zeros(p)
  done = {}  # (op, stage, microbatch) -> finish time
  for k in range(schedule.ticks):
    for s in range(p):
      op, i = int(schedule.op[k, s]), int(schedule.mb[k, s])
      if op == IDLE:
        continue
      if op == FWD:
        ready = done[FWD, s - 1, i] + link_s if s else 0.0
        cost = f[s]
      else:
        ready = done[BWD, s + 1, i] + link_s if s < p - 1 else done[FWD, s, i]
        cost = b[s]
      free[s] = max(free[s], ready) + cost
      done[op, s, i] = free[s]
  return float(free.max())
