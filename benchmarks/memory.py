r"""Per-device memory of the training step by layout (mesh x dp.zero), from the compiled
program's memory analysis, beside the analytic count, in JSON.

  python -m benchmarks.memory [--config=experiments/configs/default.py] \
      [--layouts=8x1x1:0,8x1x1:1,8x1x1:3,4x2x1:0,4x2x1:1,4x2x1:3,2x2x2:0,2x2x2:1,1x4x2:0,2x1x4:0,2x1x4:1] \
      [--out=benchmarks/results/memory.json]

Per device: parameters and optimizer state as held (bytes of device 0's shards) and as
rec_llm/models/arithmetic.py counts them (float32; AdamW: two moments per parameter); the
compiled step's arguments (state + batch), temporaries (activations, gradients, collective
buffers) and peak = arguments + outputs - aliases + temporaries. With even pipeline stages
(and no adaptive re-partitioning) each stage holds only its own blocks.
"""

import math
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from rec_llm.models import arithmetic
from rec_llm.parallel import mesh as mesh_lib
from rec_llm.sim.measure import held_bytes, memory_of
from rec_llm.train import config_check, trainer

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Config file.")
_LAYOUTS = flags.DEFINE_list(
    "layouts", ["8x1x1:0", "8x1x1:1", "8x1x1:3", "4x2x1:0", "4x2x1:1", "4x2x1:3", "2x2x2:0",
                "2x2x2:1", "1x4x2:0", "2x1x4:0", "2x1x4:1"], "data x tensor x pipe : dp.zero.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/memory.json", "Output JSON path.")


def analytic_bytes(mc, data, tensor, zero, moments, stage_blocks=None) -> dict:
  """float32 parameters and optimizer moments on one device (the step count excluded);
  `stage_blocks`: the blocks a stage holds when they are stage-local (None: all)."""
  count = lambda split: sum(math.prod(s) for s in arithmetic.param_shapes(
      mc, tensor=tensor, layers=stage_blocks, data=data if split else 1).values())
  return {"params": 4 * count(zero == 3), "opt_state": 4 * moments * count(zero >= 1)}


def measure(config, shape, zero) -> dict:
  config = config.copy_and_resolve_references()
  config.mesh.update(dict(zip(mesh_lib.MESH_AXES, shape)))
  config.dp.zero = zero
  run = trainer.build(config)
  batch = run.batches(0)
  compiled = run.compile().executables[batch["inputs"].shape[1]]
  moments = 2 if config.train.optimizer == "adamw" else int(config.train.momentum > 0)
  local = config_check.stage_local(config, shape)
  return {"mesh": "x".join(map(str, shape)), "zero": zero,
          "held": {"params": held_bytes(run.state.params),
                   "opt_state": held_bytes(run.state.opt_state),
                   "batch": held_bytes(batch)},
          "stage_local": local,
          "analytic": analytic_bytes(run.model_cfg, shape[0], shape[1], zero, moments,
                                     config.model.num_layers // shape[2] if local else None),
          "compiled": memory_of(compiled)}


def main(argv):
  del argv
  rows = []
  for spec in _LAYOUTS.value:
    mesh, zero = spec.split(":")
    row = measure(_CONFIG.value, tuple(int(x) for x in mesh.split("x")), int(zero))
    rows.append(row)
    mib = lambda b: f"{b / 2**20:7.2f}"
    print(f"{row['mesh']} zero={row['zero']}  params {mib(row['held']['params'])} "
          f"(analytic {mib(row['analytic']['params'])})  opt {mib(row['held']['opt_state'])} "
          f"(analytic {mib(row['analytic']['opt_state'])})  args {mib(row['compiled']['argument_bytes'])}"
          f"  temp {mib(row['compiled']['temp_bytes'])}  peak {mib(row['compiled']['peak_bytes'])} MiB",
          flush=True)
  common.write(_OUT.value, {"config": _CONFIG.value.to_dict(), "rows": rows})


if __name__ == "__main__":
  app.run(main)
