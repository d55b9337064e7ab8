r"""Per-device memory of the training step by layout (mesh x dp.zero), from the compiled
program's memory analysis, beside the analytic count, in JSON.

  python -m benchmarks.memory [--config=experiments/configs/default.py] \
      [--layouts=8x1x1:0,8x1x1:1,8x1x1:3,4x2x1:0,4x2x1:1,4x2x1:3,2x2x2:0,2x2x2:1,1x4x2:0,2x1x4:0,2x1x4:1] \
      [--budget_mib=256 --widths=256,512 --fit_layouts=8x1x1:0,8x1x1:1,8x1x1:3,4x2x1:1,2x2x2:0:0,2x2x2:1] \
      [--out=benchmarks/results/memory.json]

Per device: parameters and optimizer state as held (bytes of device 0's shards) and as
the simulator counts them (sim.state_params; float32; AdamW: two moments per parameter); the
compiled step's arguments (state + batch), temporaries (activations, gradients, collective
buffers) and peak = arguments + outputs - aliases + temporaries. With pipeline.stage_local
(the default) each stage holds only its own blocks (uneven stages: max(stage_layers) slots).

The largest model under a per-device budget: for each fit layout (`:0` after the zero
stage: pipeline.stage_local=False) and width (d_model, with the MLP at 4 x d_model), the
most blocks (a multiple of pipe) whose compiled step's peak fits --budget_mib, found from
the compiled programs alone (abstract state): two compiles fit peak = a + b x blocks, then
compiles at the predicted count and one stage more confirm the largest that fits.
"""

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

from absl import app, flags
from ml_collections import config_flags

from benchmarks import common
from rec_llm.models import arithmetic
from rec_llm.parallel import schedules, sharding
from rec_llm.sim import cost_model as cm, simulator as sim
from rec_llm.sim.measure import held_bytes, memory_of
from rec_llm.train import config_check, trainer

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/default.py", "Config file.")
_LAYOUTS = flags.DEFINE_list(
    "layouts", ["8x1x1:0", "8x1x1:1", "8x1x1:3", "4x2x1:0", "4x2x1:1", "4x2x1:3", "2x2x2:0",
                "2x2x2:1", "1x4x2:0", "2x1x4:0", "2x1x4:1"], "data x tensor x pipe : dp.zero.")
_OUT = flags.DEFINE_string("out", "benchmarks/results/memory.json", "Output JSON path.")
_BUDGET = flags.DEFINE_float("budget_mib", 256, "Per-device budget for the largest model.")
_WIDTHS = flags.DEFINE_list("widths", ["256", "512"], "d_model values for the largest model.")
_FIT = flags.DEFINE_list("fit_layouts", ["8x1x1:0", "8x1x1:1", "8x1x1:3", "4x2x1:1",
                                         "2x2x2:0:0", "2x2x2:1"],
                         "Layouts (mesh:zero[:stage_local]) for the largest model; empty: skip.")


def analytic_bytes(config, shape, zero, moments, local) -> dict:
  """float32 parameters and optimizer moments on one device (the step count excluded), as
  the simulator counts the state (sim.state_params)."""
  sizes = schedules.stage_sizes(config.model.num_layers, shape[2],
                                config_check.pipeline_config(config)["stage_layers"])
  plan = sim.Plan(data=shape[0], tensor=shape[1], pipe=shape[2], zero=zero, stage_local=local,
                  stage_layers=sizes)
  held = sim.state_params(cm.ModelSpec.from_config(config), plan, sizes)
  return {"params": 4 * held["params"], "opt_state": 4 * moments * held["updated"]}


def measure(config, spec: str) -> dict:
  shape, zero = common.layout(spec)[:2]
  config = common.layout_config(config, spec)
  run = trainer.build(config)
  batch = run.batches(0)
  compiled = run.compile().executables[batch["inputs"].shape[1]]
  moments = 2 if config.train.optimizer == "adamw" else int(config.train.momentum > 0)
  local = config_check.stage_local(config, shape)
  return {"mesh": "x".join(map(str, shape)), "zero": zero,
          "stage_layers": list(config.pipeline.stage_layers),
          "held": {"params": held_bytes(run.state.params),
                   "opt_state": held_bytes(run.state.opt_state),
                   "batch": held_bytes(batch)},
          "stage_local": local,
          "analytic": analytic_bytes(config, shape, zero, moments, local),
          "compiled": memory_of(compiled)}


def _layout_config(config, spec: str, width: int, blocks: int):
  """The config of a fit layout (mesh:zero[:stage_local]) at this width and depth."""
  config = common.layout_config(config, spec)
  config.model.update(num_layers=blocks, d_model=width, mlp_dim=4 * width)
  return config


def compiled_peak(config) -> int:
  """Peak bytes per device of the compiled step (abstract state: nothing is allocated)."""
  run = trainer.build(config, init=False)
  with sharding.activate(run.mesh):
    compiled = run.train_step.lower(run.abstract_state,
                                    run.batches.spec(max(run.batches.widths))).compile()
  return memory_of(compiled)["peak_bytes"]


def largest_model(config, spec: str, width: int, budget: float) -> dict:
  """The most blocks (a multiple of pipe) at this width whose step's peak fits `budget`:
  a line through two compiles guesses it, compiles settle it (n fits, n + pipe does not)."""
  step = _layout_config(config, spec, width, 1).mesh.pipe
  peak = {}

  def at(n):
    if n not in peak:
      peak[n] = compiled_peak(_layout_config(config, spec, width, n))
    return peak[n]

  slope = (at(2 * step) - at(step)) / step
  blocks = max(step, int((budget - at(step)) / slope) // step * step)
  while True:
    if at(blocks) > budget and blocks > step:
      blocks -= step
    elif at(blocks + step) <= budget:
      blocks += step
    else:
      break
  fits = at(blocks) <= budget
  counts = arithmetic.count_params(cm.ModelSpec.from_config(
      _layout_config(config, spec, width, blocks)))
  return {"layout": spec, "width": width, "blocks": blocks if fits else 0,
          "params": sum(counts.values()) if fits else 0, "peak_bytes": peak[blocks],
          "compiles": len(peak), "peak_by_blocks": {str(k): v for k, v in sorted(peak.items())}}


def main(argv):
  del argv
  rows = []
  for spec in _LAYOUTS.value:
    row = measure(_CONFIG.value, spec)
    rows.append(row)
    mib = lambda b: f"{b / 2**20:7.2f}"
    print(f"{row['mesh']} zero={row['zero']}  params {mib(row['held']['params'])} "
          f"(analytic {mib(row['analytic']['params'])})  opt {mib(row['held']['opt_state'])} "
          f"(analytic {mib(row['analytic']['opt_state'])})  args {mib(row['compiled']['argument_bytes'])}"
          f"  temp {mib(row['compiled']['temp_bytes'])}  peak {mib(row['compiled']['peak_bytes'])} MiB",
          flush=True)
  budget = _BUDGET.value * 2**20
  fits = []
  for spec in _FIT.value:
    for width in (int(w) for w in _WIDTHS.value):
      fits.append(largest_model(_CONFIG.value, spec, width, budget))
      r = fits[-1]
      print(f"{spec} width {width}: {r['blocks']} blocks, {r['params'] / 1e6:.2f}M parameters, "
            f"peak {r['peak_bytes'] / 2**20:.1f} MiB ({r['compiles']} compiles)", flush=True)
  common.write(_OUT.value, {"config": _CONFIG.value.to_dict(), "rows": rows,
                            "budget_mib": _BUDGET.value, "largest_model": fits})


if __name__ == "__main__":
  app.run(main)
