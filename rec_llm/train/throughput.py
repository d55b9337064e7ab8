"""Peak FLOP/s for MFU: from the config, a table of accelerators, or a measured matmul."""

import time

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak per chip, from the vendors' data sheets.
_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0,
                "TPU v5 lite": 197.0, "TPU v5e": 197.0, "TPU v5p": 459.0, "TPU v6": 918.0}


def measured_matmul_flops(device: jax.Device, n: int = 1024, repeats: int = 5) -> float:
  """Median FLOP/s of an n^3 float32 matmul on `device`."""
  a = jax.device_put(jnp.ones((n, n), jnp.float32), device)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2.0 * n**3 / float(np.median(times))


def total_peak_flops(devices: list[jax.Device], peak_tflops_per_device: float = 0.0) -> tuple[float, str]:
  """Peak FLOP/s of all `devices` together, and where the number came from.

  Virtual CPU devices share their host's cores, so on CPU the peak is one measured matmul
  per process, not per device.
  """
  if peak_tflops_per_device > 0:
    return peak_tflops_per_device * 1e12 * len(devices), "config"
  kind = devices[0].device_kind
  for name, tflops in _PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return tflops * 1e12 * len(devices), f"table:{name}"
  local = [d for d in devices if d.process_index == jax.process_index()]
  per = measured_matmul_flops(local[0])
  if devices[0].platform == "cpu":
    return per * len({d.process_index for d in devices}), "measured:cpu-host"
  return per * len(devices), "measured"
