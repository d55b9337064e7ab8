"""What every command line here shares: bad input ends in one `error:` line and exit 2."""

import math
import sys

from absl import flags


def fail(msg: str, code: int = 2):
  print(f"error: {msg}", file=sys.stderr)
  sys.exit(code)


def flags_parser(module: str):
  """An absl `flags_parser` turning bad flags, config paths, keys and values into one line."""

  def parse(argv):
    try:
      return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
      bad = [a for a in argv[1:] if a.startswith("--config")]
      if isinstance(e, (AttributeError, KeyError)):
        hint = "unknown config key " + repr(str(e).strip("\"' "))
      else:
        hint = " ".join(line.strip() for line in str(e).splitlines()[:4])
      where = f" ({' '.join(bad)})" if bad else ""
      fail(f"bad flag{where}: {hint}; python -m {module} --helpfull lists the flags")

  return parse


def load_config(config_flag, example: str):
  """The config of a `config_flags.DEFINE_config_file` flag, or one `error:` line."""
  try:
    config = config_flag.value
    if config is not None:
      config.keys()  # a config file that failed to load only raises when used
  except Exception as e:  # a missing file, or one that does not import
    fail(f"cannot load the config file: {str(e).strip().splitlines()[-1].strip()}")
  if config is None:
    fail(f"--config is required, e.g. --config={example}")
  return config


def host_devices(config, requested: int) -> int:
  """Virtual CPU devices to create: `requested` if positive, else as many as the config's
  mesh has (8 when a mesh axis is -1, to be resolved). Extra virtual devices on a CPU only
  split its cores into more, smaller programs: a 1x1x1 mesh gets one device."""
  from rec_llm.parallel.mesh import MESH_AXES  # here: --help stays free of JAX
  if requested > 0:
    return requested
  dims = [int(config.mesh[a]) for a in MESH_AXES]
  return 8 if min(dims) < 1 else math.prod(dims)
