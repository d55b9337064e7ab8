"""Conditional execution of code that contains collectives.

`lax.cond` lowers to an HLO conditional, and XLA:CPU's thunk runtime appears not to order
the collectives inside a conditional's branch with those outside it: devices can then meet
at different all-reduces (JAX gives every collective the same channel id) and read the wrong
buffers (inferred from the crash below and its cure, not from XLA's source). Seen as a
segfault in `InProcessCommunicator::AllReduce` within ~15 steps of a local-SGD step whose
outer update (an all-reduce) sat in a `lax.cond` (jax 0.10.2). A while loop is ordered
correctly, so `run_if` runs `fn` in a loop of zero or one trips. It is for code the program
differentiates by hand (a while loop has no reverse-mode derivative).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

from rec_llm.parallel.hlo_stats import AT_MOST_ONCE


def run_if(pred, fn: Callable[[Any], Any], operand):
  """fn(operand) where `pred` (a scalar bool, the same on every device of a collective in
  `fn`) holds, else operand; `fn` keeps operand's structure, shapes and dtypes.

  The loop runs in the named scope AT_MOST_ONCE, so rec_llm/parallel/hlo_stats.py counts its
  collectives once, as if taken (like a conditional's), not as a loop of unknown trips."""
  with jax.named_scope(AT_MOST_ONCE):
    _, out = lax.while_loop(lambda c: c[0], lambda c: (jnp.zeros_like(c[0]), fn(c[1])),
                            (jnp.asarray(pred, bool), operand))
  return out
