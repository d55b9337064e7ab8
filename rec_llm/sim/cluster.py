"""Cluster specs: devices, links, speeds, and presets from datasheets or this machine's calibration.

A cluster is `nodes` x `devices_per_node` devices. Links are given per device: `bandwidth`
is the unidirectional bus bandwidth one device can drive (bytes/s) and `latency` the
per-step latency of a collective algorithm (s). Devices on one node talk over `intra`,
across nodes over `inter`.

Presets (`preset(name)`):
- 'this_machine': the CPU host these tests run on, with 8 virtual devices (one "node" per
  process). From a calibration JSON (rec_llm/sim/measure.py) when given, else the defaults
  below, measured the same way on the project's 2-core machine.
- 'h100x8': one 8 x H100 SXM node (NVLink 4 through NVSwitch).
- 'h100x128': 16 such nodes, 400 Gb/s InfiniBand per GPU between nodes.
- 'mixed_a100_h100': 2 nodes of 8 x A100 + 2 nodes of 8 x H100 (heterogeneous speeds).
- One per device kind, each from its own datasheet ('a100_40gb', 'a100_80gb', 'h100', 'h200',
  'tpu_v5p'; DEVICE_PRESETS), as many devices as asked for (default: one node).
"""

import dataclasses
import json
import math
import os

from rec_llm.errors import ConfigError

GB = 1e9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Link:
  bandwidth: float  # bytes/s one device can send (unidirectional bus bandwidth)
  latency: float    # s per algorithm step


@dataclasses.dataclass(frozen=True)
class Cluster:
  name: str
  device_kind: str
  nodes: int
  devices_per_node: int
  peak_flops: float             # per device, dense (bf16 on accelerators): MFU's denominator
  memory_bytes: float           # per device
  memory_bandwidth: float       # bytes/s per device (HBM, or host RAM on CPU)
  intra: Link
  inter: Link
  efficiency: float = 0.6       # achievable fraction of peak for the model's matmuls
  mem_efficiency: float = 0.8   # achievable fraction of memory bandwidth
  call_overhead: float = 5e-6   # s per kernel launch / op dispatch
  step_overhead: float = 0.0    # s per step: host dispatch and synchronisation
  speed: tuple = ()             # per-device compute speed factor (1 = nominal); () = all 1
  mem_speed: tuple = ()         # per-device memory-bandwidth factor; () = as `speed`
  straggler_sigma: float = 0.0  # per-device, per-step lognormal noise on compute time
  overlap: float = 1.0          # share of the backward that can hide the data-parallel reduction
  # Virtual devices that time-share one host's cores (see cost_model.host_speedup).
  shared_host: bool = False
  host_speedup: float = 1.0
  optimizer_s_per_param: float = 0.0   # measured AdamW update time; 0: from memory bandwidth
  collectives: tuple = ()       # measured fits: dicts(level, kind, group, alpha_s, beta_Bps)
  components: dict | None = None  # measured block / embed / head times (measure.py)
  # Fitted to timed training steps of a few plans (rec_llm/sim/calibrate.py); these
  # defaults leave the analytic model as it is.
  compute_scale: float = 1.0          # in-step compute over the components' measured times
  pipe_compute_scale: float = 1.0     # and inside a pipeline's stage loops, relative to that
  tp_sync_s_per_byte: float = 0.0     # s per byte of a tensor all-reduce beyond its alpha-beta
  tick_s: float = 0.0                 # s per pipeline tick: its loops, slot updates, meetings
  pipe_buffer_s_per_byte: float = 0.0  # s per byte of the pipeline's in-flight residuals
  process_compute_scale: float = 1.0  # compute slowdown when processes share the host
  inter_sync_s: float = 0.0           # s per data-parallel collective across nodes, beyond it
  source: str = "datasheet"

  @property
  def devices(self) -> int:
    return self.nodes * self.devices_per_node

  @property
  def total_peak_flops(self) -> float:
    """MFU's denominator: the sum of each device's own peak (`speed` scales the nominal one).
    Virtual CPU devices share their host: one peak per host (process), as
    rec_llm/train/throughput.py counts it."""
    return self.peak_flops * (self.nodes if self.shared_host else sum(self.speeds()))

  def speeds(self) -> list[float]:
    return list(self.speed) if self.speed else [1.0] * self.devices

  def effective_speeds(self, compute_share: float) -> list[float]:
    """Per device, the speed of work that spends `compute_share` of its nominal time on
    arithmetic and the rest on memory traffic: each part at the device's own rate (a per-
    device roofline: an A100 is 0.32 of an H100 in FLOP/s but 0.61 in bandwidth)."""
    mem = list(self.mem_speed) if self.mem_speed else self.speeds()
    return [1.0 / (compute_share / s + (1.0 - compute_share) / b)
            for s, b in zip(self.speeds(), mem)]

  def with_devices(self, n: int) -> "Cluster":
    """The same hardware with `n` devices: fewer per node, or more whole nodes."""
    dpn = self.devices_per_node
    if n < 1:
      raise ConfigError(f"--devices={n} must be a positive number of devices")
    if n == self.devices:
      return self
    if n <= dpn and self.nodes == 1:
      nodes, per = 1, n
    elif n % dpn == 0:
      nodes, per = n // dpn, dpn
    else:
      raise ConfigError(f"--devices={n} does not fill whole nodes of {dpn} devices on "
                        f"cluster {self.name!r}; use a multiple of {dpn}")
    def pattern(values):  # repeat the node pattern (e.g. A100 nodes, then H100 nodes)
      if not values:
        return ()
      node = [values[i * dpn:(i + 1) * dpn] for i in range(self.nodes)]
      return tuple(s for k in range(nodes) for s in node[k % self.nodes][:per])
    return dataclasses.replace(self, nodes=nodes, devices_per_node=per,
                               speed=pattern(self.speed), mem_speed=pattern(self.mem_speed))

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["components"] = None if self.components is None else "(measured tables)"
    d["collectives"] = len(self.collectives)
    return d


# Datasheet figures (dense, no sparsity):
# - NVIDIA H100 SXM5: 989 TFLOP/s bf16, 80 GB HBM3 at 3.35 TB/s, NVLink 4 at 900 GB/s per
#   GPU (450 GB/s each way) through NVSwitch (NVIDIA H100 Tensor Core GPU datasheet).
# - NVIDIA A100 SXM4 80GB: 312 TFLOP/s bf16, 80 GB HBM2e at 2,039 GB/s, NVLink 3 at
#   600 GB/s per GPU (300 GB/s each way) (NVIDIA A100 datasheet).
# - Between nodes: one 400 Gb/s NDR InfiniBand (ConnectX-7) adapter per GPU, as in DGX H100
#   (50 GB/s each way per GPU); DGX A100 has 200 Gb/s HDR per GPU (25 GB/s).
# Latencies (per algorithm step, not datasheet figures): about 5 us over NVLink and 10 us over
# InfiniBand including NCCL's protocol overhead; efficiency 0.6 of peak for large bf16 matmuls
# and 0.8 of memory bandwidth are typical achieved fractions, not guarantees.
_H100 = dict(device_kind="NVIDIA H100 80GB HBM3", peak_flops=989e12, memory_bytes=80 * GB,
             memory_bandwidth=3.35e12, intra=Link(450 * GB, 5e-6), inter=Link(50 * GB, 10e-6),
             efficiency=0.6, mem_efficiency=0.8, call_overhead=5e-6, step_overhead=2e-4,
             overlap=1.0)
_A100_OVER_H100 = 312.0 / 989.0

# Per device kind, each from its own datasheet (dense bf16 peak; HBM size and bandwidth;
# the node's links per device, each way), nodes of `per_node` devices:
# - A100 SXM4 40GB / 80GB: 312 TFLOP/s; 40 GB HBM2 at 1,555 GB/s / 80 GB HBM2e at 2,039 GB/s;
#   NVLink 3 600 GB/s per GPU; DGX A100: one 200 Gb/s HDR InfiniBand adapter per GPU.
# - H100 SXM5: as _H100. H200 SXM: the same compute and links, 141 GB HBM3e at 4.8 TB/s.
# - TPU v5p: 459 TFLOP/s bf16, 95 GB HBM2e at 2,765 GB/s, inter-chip interconnect 4,800 Gb/s
#   per chip over 6 links (3-D torus): every axis of a slice rides ICI, taken here as 100 GB/s
#   each way for a ring along one torus dimension; 4 chips per host ('node').
# Latencies, efficiency and mem_efficiency as for _H100 (assumptions, not datasheet figures).
_A100 = dict(_H100, device_kind="NVIDIA A100-SXM4-80GB", peak_flops=312e12,
             memory_bandwidth=2.039e12, intra=Link(300 * GB, 5e-6), inter=Link(25 * GB, 10e-6))
DEVICE_PRESETS = {
    "a100_40gb": (8, dict(_A100, device_kind="NVIDIA A100-SXM4-40GB", memory_bytes=40 * GB,
                          memory_bandwidth=1.555e12)),
    "a100_80gb": (8, _A100),
    "h100": (8, _H100),
    "h200": (8, dict(_H100, device_kind="NVIDIA H200", memory_bytes=141 * GB,
                     memory_bandwidth=4.8e12)),
    "tpu_v5p": (4, dict(_H100, device_kind="TPU v5p", peak_flops=459e12, memory_bytes=95 * GB,
                        memory_bandwidth=2.765e12, intra=Link(100 * GB, 5e-6),
                        inter=Link(100 * GB, 5e-6))),
}

# 'this_machine' without a calibration file: the calibration measured on the project's 2-core
# CPU machine by `python -m benchmarks.sim_calibration` (8 virtual devices, float32, the
# default config's model), shipped next to this module. If it is missing, these round
# figures from the same measurements stand in (no component tables: a plain roofline).
DEFAULT_CALIBRATION = os.path.join(os.path.dirname(os.path.abspath(__file__)), "this_machine.json")
THIS_MACHINE_DEFAULTS = dict(
    matmul_flops=1.9e11, memory_bandwidth=8e9, host_speedup=1.1, call_overhead_s=4e-8,
    step_overhead_s=2e-4, optimizer_s_per_param=1.4e-9, host_memory_bytes=24 * GIB,
    collectives={"all-reduce": (7e-5, 1.5e9), "all-gather": (5e-5, 3e9),
                 "collective-permute": (1.1e-4, 1.9e9), "all-to-all": (7e-5, 1.3e9)},
    inter_collectives={"all-reduce": (2e-3, 4e8), "all-gather": (1e-3, 1e9),
                       "collective-permute": (2e-4, 9e8), "all-to-all": (3e-4, 7e8)})

PRESETS = ("this_machine", "h100x8", "h100x128", "mixed_a100_h100") + tuple(DEVICE_PRESETS)


def this_machine(calibration: dict | None = None, processes: int = 1, devices: int = 8) -> Cluster:
  """The CPU host with `devices` virtual devices split over `processes` (a 'node' each)."""
  if calibration is None and os.path.exists(DEFAULT_CALIBRATION):
    calibration = load_calibration(DEFAULT_CALIBRATION)
    calibration["source"] = "rec_llm/sim/this_machine.json (measured on the project's machine)"
  cal = calibration or {}
  d = THIS_MACHINE_DEFAULTS
  if devices % processes:
    raise ConfigError(f"{devices} devices do not split over {processes} processes")
  colls = list(cal.get("collectives", ()))
  if not colls:  # the defaults: one fit per kind, as if measured on groups of 2
    colls = [dict(level=lvl, kind=k, group=2, alpha_s=a, beta_Bps=b)
             for lvl, table in (("intra", d["collectives"]), ("inter", d["inter_collectives"]))
             for k, (a, b) in table.items()]
  # Element-wise work of all devices is summed (they share the host), so it runs at the
  # bandwidth all devices get together; the optimizer (memory-bound) too.
  mem_bw = float(cal.get("memory_bandwidth_all_devices", cal.get("memory_bandwidth", d["memory_bandwidth"])))
  opt_scale = float(cal.get("memory_bandwidth", mem_bw)) / mem_bw
  # Several processes on one host: their dispatch overhead as measured across processes.
  # (The calibration also records how fast both processes compute at once; on a machine
  # shared with other jobs that ratio reflects the scheduler's fair share, not what a step
  # with cross-process collectives inside gets, so it is not applied.)
  mp = cal.get("multiprocess") if processes > 1 else None
  step_overhead = float(mp["step_overhead_s"]) if mp else \
      float(cal.get("step_overhead_s", d["step_overhead_s"]))
  host_mem = float(cal.get("host_memory_bytes", d["host_memory_bytes"]))
  return Cluster(
      name="this_machine", device_kind=cal.get("device_kind", "cpu"), nodes=processes,
      devices_per_node=devices // processes,
      peak_flops=float(cal.get("matmul_flops", d["matmul_flops"])),
      memory_bytes=host_mem / devices, memory_bandwidth=mem_bw,
      # Collectives use the measured fits below; these links are only their fallback.
      intra=Link(2e9, 1e-4), inter=Link(3e8, 1e-3),
      efficiency=1.0, mem_efficiency=1.0,  # the peak and bandwidth are measured, not datasheet
      call_overhead=float(cal.get("call_overhead_s", d["call_overhead_s"])),
      step_overhead=step_overhead,
      overlap=0.0,  # compute and collectives share the same cores: nothing hides
      shared_host=True,
      optimizer_s_per_param=opt_scale * float(cal.get("optimizer_s_per_param", d["optimizer_s_per_param"])),
      collectives=tuple(colls), components=cal.get("components"),
      **{"host_speedup": _host_speedup(cal), **step_corrections(cal, processes)},
      source=cal.get("source", "defaults measured on the project's 2-core machine"))


CORRECTIONS = ("compute_scale", "pipe_compute_scale", "host_speedup", "tp_sync_s_per_byte", "tick_s",
               "pipe_buffer_s_per_byte", "process_compute_scale", "inter_sync_s")


def step_corrections(cal: dict, processes: int = 1) -> dict:
  """The calibration's fitted in-step corrections (calibrate.py) for a run of `processes`."""
  fit = dict(cal.get("step_corrections") or {})
  out = {k: float(fit[k]) for k in CORRECTIONS if k in fit}
  if processes <= 1:
    out.pop("process_compute_scale", None)
    out.pop("inter_sync_s", None)
  return out


def _host_speedup(cal: dict) -> float:
  """The measured all-devices speedup, kept within [0.5, 2] (a ratio of two timings on a
  shared machine: one noisy run must not scale every prediction wildly)."""
  hs = cal.get("host_speedup_measured")
  g = hs["speedup"] if isinstance(hs, dict) else THIS_MACHINE_DEFAULTS["host_speedup"]
  return float(min(max(g, 0.5), 2.0))


def load_calibration(path: str) -> dict:
  try:
    with open(path) as f:
      cal = json.load(f)
  except OSError as e:
    raise ConfigError(f"cannot read the calibration file {path!r}: {e.strerror}; run "
                      "python -m benchmarks.sim_calibration to write one") from None
  except json.JSONDecodeError as e:
    raise ConfigError(f"calibration file {path!r} is not valid JSON ({e.msg} at line {e.lineno})") from None
  cal = cal.get("calibration", cal)  # the benchmark's result file holds it under 'calibration'
  if "matmul_flops" not in cal:
    raise ConfigError(f"{path!r} is not a calibration file (no 'matmul_flops'); write one with "
                      "python -m benchmarks.sim_calibration")
  cal.setdefault("source", path)
  return cal


def preset(name: str, devices: int | None = None, calibration: str | dict | None = None,
           processes: int = 1) -> Cluster:
  """A named cluster, optionally resized to `devices` (whole nodes beyond one node)."""
  if name not in PRESETS:
    raise ConfigError(f"unknown cluster preset {name!r}; choose one of {list(PRESETS)}")
  if calibration is not None and name != "this_machine":
    raise ConfigError(f"a calibration file describes this machine; use it with "
                      f"--cluster=this_machine, not {name!r}")
  if name == "this_machine":
    cal = load_calibration(calibration) if isinstance(calibration, str) else calibration
    c = this_machine(cal, processes=processes, devices=devices or 8)
    return c
  if name in DEVICE_PRESETS:
    per_node, spec = DEVICE_PRESETS[name]
    n = per_node if devices is None else int(devices)
    return Cluster(name=name, nodes=1, devices_per_node=min(n, per_node), **spec).with_devices(n)
  if name == "h100x8":
    c = Cluster(name=name, nodes=1, devices_per_node=8, **_H100)
  elif name == "h100x128":
    c = Cluster(name=name, nodes=16, devices_per_node=8, straggler_sigma=0.03, **_H100)
    # sigma: an assumption (a few % step-to-step jitter per GPU at scale), not a datasheet figure.
  else:  # mixed_a100_h100: nodes 0-1 A100, nodes 2-3 H100; links limited by the A100 nodes
    c = Cluster(name=name, nodes=4, devices_per_node=8,
                speed=tuple([_A100_OVER_H100] * 16 + [1.0] * 16),
                mem_speed=tuple([_A100["memory_bandwidth"] / _H100["memory_bandwidth"]] * 16
                                + [1.0] * 16),
                **{**_H100, "device_kind": "NVIDIA A100 80GB + H100 80GB",
                   "intra": Link(300 * GB, 5e-6), "inter": Link(25 * GB, 10e-6)})
  return c if devices is None else c.with_devices(int(devices))


def collective_steps(kind: str, n: int) -> int:
  """Latency steps of the ring algorithm for `kind` on a group of n."""
  if n <= 1:
    return 0
  return {"all-reduce": 2 * (n - 1), "collective-permute": 1}.get(kind, n - 1)


def ring_factor(kind: str, n: int) -> float:
  """Bytes on the busiest link per payload byte (hlo_stats payload conventions)."""
  if n <= 1:
    return 0.0
  if kind == "all-reduce":
    return 2.0 * (n - 1) / n
  if kind == "collective-permute":
    return 1.0
  return (n - 1) / n  # all-gather (result), reduce-scatter (operand), all-to-all


def collective_time(cluster: Cluster, kind: str, payload: float, n: int, level: str) -> float:
  """Seconds for one collective of `payload` bytes per device on a group of n.

  With measured fits (this machine) the fit nearest in group size is rescaled by the ring
  factor; otherwise the ring algorithm on the level's link: steps * latency + factor *
  payload / bandwidth.
  """
  if n <= 1 or payload <= 0:
    return 0.0
  fits = [c for c in cluster.collectives if c["kind"] == kind and c["level"] == level]
  if not fits and level == "inter":
    fits = [c for c in cluster.collectives if c["kind"] == kind]
  if fits:
    fit = min(fits, key=lambda c: (abs(math.log(c["group"] / n)), -c["group"]))
    scale = ring_factor(kind, n) / ring_factor(kind, fit["group"])
    return fit["alpha_s"] + payload * scale / fit["beta_Bps"]
  link = cluster.intra if level == "intra" else cluster.inter
  return collective_steps(kind, n) * link.latency + ring_factor(kind, n) * payload / link.bandwidth
