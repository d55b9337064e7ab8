"""The one exception type for bad user input (configs, meshes, data).

Entry points catch it and print a single line naming the problem and the fix,
instead of a traceback.
"""


class ConfigError(ValueError):
  """A user-facing input problem; the message says what is wrong and how to fix it."""


class TrainingError(RuntimeError):
  """A run that must stop (e.g. a non-finite loss with train.nonfinite='stop'); says why."""
