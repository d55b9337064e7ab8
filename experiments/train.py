r"""Train a recommender from a config file.

  python -m experiments.train --config=experiments/configs/default.py --workdir=/tmp/rec_llm/run \
      [--config.mesh.data=2 --config.mesh.tensor=4 ...]

Bad input (mesh, sizes, unknown names, a config key default.py does not have or lacks)
ends with one `error:` line and exit code 2.
"""

import os

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import cli
from experiments.configs import default

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for metrics.jsonl (and checkpoints).")
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices", 0, "Virtual CPU devices to create when XLA_FLAGS does not set a count "
    "(only affects the CPU backend); 0: as many as the config's mesh has (8 if it has a -1).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = cli.load_config(_CONFIG, "experiments/configs/default.py")
  import jax  # after flag parsing, so --help stays fast
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    jax.config.update("jax_num_cpu_devices", cli.host_devices(config, _HOST_DEVICES.value))
  from rec_llm.errors import ConfigError, TrainingError
  from rec_llm.parallel import distributed
  from rec_llm.train import config_check, trainer
  distributed.initialize_from_env()
  logging.info("process %d/%d, %d local devices of %d (%s)", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)
  try:
    config_check.check_fields(config, default.get_config())
    trainer.train(config, _WORKDIR.value)
  except ConfigError as e:
    cli.fail(str(e))
  except TrainingError as e:
    cli.fail(str(e), code=3)


if __name__ == "__main__":
  logging.set_verbosity(logging.INFO)
  app.run(main, flags_parser=cli.flags_parser("experiments.train"))
