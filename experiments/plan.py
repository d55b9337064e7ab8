r"""Print the best parallel plans for a config on a cluster (predicted by rec_llm/sim).

  python -m experiments.plan --config=experiments/configs/large_1b.py --cluster=h100x128 \
      [--devices=1024] [--top=5] [--calibration=FILE] [--trace=best.json] \
      [--compression=none,int8,topk,powersgd] [--dp_modes=sync]

Clusters: this_machine (8 virtual CPU devices; --calibration=FILE from
`python -m benchmarks.sim_calibration`), h100x8, h100x128, mixed_a100_h100. `--trace`
writes the best plan's step as a Chrome trace (open in https://ui.perfetto.dev).
Bad input ends with one `error:` line and exit code 2.
"""

import json

from absl import app, flags
from ml_collections import config_flags

from experiments import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.")
_CLUSTER = flags.DEFINE_string("cluster", "this_machine", "Cluster preset.")
_DEVICES = flags.DEFINE_integer("devices", None, "Resize the cluster to this many devices.")
_TOP = flags.DEFINE_integer("top", 5, "Plans to print.")
_CALIBRATION = flags.DEFINE_string("calibration", None, "this_machine calibration JSON.")
_TRACE = flags.DEFINE_string("trace", None, "Write the best plan's Chrome trace here.")
_COMPRESSION = flags.DEFINE_list("compression", ["none", "int8", "topk", "powersgd"],
                                 "Gradient compressions to consider (data > 1).")
_DP_MODES = flags.DEFINE_list("dp_modes", ["sync"], "Data-parallel modes: sync, stale, local_sgd.")
_NUM_ITEMS = flags.DEFINE_integer("num_items", None, "Item count when the config has none.")
_JSON = flags.DEFINE_string("json", None, "Also write the plans (rows with breakdowns) here.")



def table(results, stats, cluster) -> str:
  head = (f"{'#':>2} {'mesh':>9} {'sched':>5} {'mb':>3} {'partition':<16} {'remat':>5} "
          f"{'zero':>4} {'compression':<18} {'step ms':>9} {'tokens/s':>12} {'MFU':>6} {'mem GiB':>8}")
  lines = [f"cluster {cluster.name}: {cluster.devices} x {cluster.device_kind} "
           f"({cluster.nodes} node(s) x {cluster.devices_per_node}); {stats['feasible']} of "
           f"{stats['considered']} plans fit in memory; searched in {stats['seconds']:.2f}s",
           head, "-" * len(head)]
  for i, r in enumerate(results, 1):
    row = r.row()
    part = ",".join(map(str, row["partition"]))
    lines.append(f"{i:>2} {row['mesh']:>9} {row['schedule']:>5} {row['microbatches']:>3} "
                 f"{part:<16} {str(row['remat']):>5} {row['zero']:>4} {row['compression']:<18} "
                 f"{row['step_s'] * 1e3:>9.2f} {row['tokens_per_s']:>12,.0f} "
                 f"{100 * row['mfu']:>5.1f}% {row['memory_gib']:>8.2f}"
                 + ("  shares*" if row["batch_shares"] else ""))
  if any(r.plan.batch_shares for r in results):
    lines.append("* batch shares in proportion to replica speed: simulated only (the engine "
                 "splits the batch evenly)")
  return "\n".join(lines)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from rec_llm.errors import ConfigError
  from rec_llm.sim import cluster as cluster_lib
  from rec_llm.sim import cost_model, planner, simulator
  config = cli.load_config(_CONFIG, "experiments/configs/default.py")
  try:
    cluster = cluster_lib.preset(_CLUSTER.value, _DEVICES.value, _CALIBRATION.value)
    m = cost_model.ModelSpec.from_config(config, _NUM_ITEMS.value)
    batch = simulator.Batch(int(config.train.batch_size), int(config.model.max_len))
    opts = planner.Options(compressions=tuple(_COMPRESSION.value), dp_modes=tuple(_DP_MODES.value))
    results, stats = planner.plan(m, batch, cluster, top=_TOP.value, options=opts)
  except ConfigError as e:
    cli.fail(str(e))
  if not results:
    need = stats["min_infeasible_memory_bytes"] / 2**30
    cli.fail(f"no plan fits in {cluster.memory_bytes / 2**30:.1f} GiB per device on "
          f"{cluster.name!r} (the smallest needs {need:.1f} GiB); use more devices "
          "(--devices) or a smaller batch (--config.train.batch_size)")
  print(table(results, stats, cluster))
  best = results[0]
  bd = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in best.breakdown.items() if v)
  print(f"best plan breakdown (ms): {bd}")
  if _TRACE.value:
    traced = simulator.simulate(m, batch, cluster, best.plan, timeline=True)
    with open(_TRACE.value, "w") as f:
      json.dump(simulator.chrome_trace(traced), f)
    print(f"wrote {_TRACE.value} (open in https://ui.perfetto.dev)")
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"cluster": cluster.to_dict(), "model": m.to_dict(), "stats": stats,
                 "plans": [r.row() for r in results]}, f, indent=2)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.flags_parser("experiments.plan"))
