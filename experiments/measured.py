"""A measured sweep point: train it on this machine's devices for a few steps and time it.

Step time, tokens/s and MFU are the medians of the trainer's logged `step_time_s`,
`tokens_per_s` and `mfu` (train.log_every = 1) after the first step, which pays for
warm-up. With `quality`, the held-out metrics the trainer logs at the end come along.
"""

import statistics

from experiments import points as points_lib


def local_devices():
  import jax
  return jax.devices()


def setup(point: dict):
  """(run config, devices it runs on); ConfigError if this machine cannot run it."""
  from rec_llm.errors import ConfigError
  from rec_llm.train import config_check
  devices = local_devices()
  d, t, p = points_lib.parse_mesh(point["mesh"], point["devices"] or len(devices))
  n = d * t * p
  if n > len(devices):
    raise ConfigError(f"mesh {point['mesh']} needs {n} devices but this machine has "
                      f"{len(devices)} (set XLA_FLAGS=--xla_force_host_platform_device_count=N)")
  config = points_lib.run_config(point, devices=n)
  config_check.check(config, n)
  return config, devices[:n]


def run(point: dict) -> dict:
  from rec_llm.train import trainer
  config, devices = setup(point)
  history = trainer.train(config, None, devices=devices)
  logged = [r for r in history if "step_time_s" in r]
  timed = logged[1:] or logged
  med = lambda k: statistics.median(r[k] for r in timed)
  m = config.mesh
  quality = {k: v for r in history for k, v in r.items() if k.startswith(("test/", "eval/"))}
  return {"status": "ok", "mesh": f"{m.data}x{m.tensor}x{m.pipe}", "devices": len(devices),
          "device_kind": devices[0].device_kind, "schedule": config.pipeline.schedule
          if m.pipe > 1 else "-", "microbatches": config.pipeline.microbatches if m.pipe > 1 else 1,
          "compression": config.dp.compression.kind, "aggregator": config.dp.aggregator,
          "dp_mode": config.dp.mode, "step_time_s": med("step_time_s"),
          "tokens_per_s": med("tokens_per_s"), "mfu": med("mfu"),
          "step_times_s": [r["step_time_s"] for r in logged],
          "final_loss": logged[-1]["loss"], "quality": quality, "config": config.to_dict()}
