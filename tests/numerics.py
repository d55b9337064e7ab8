"""The floating-point error model behind every numerical tolerance in the tests.

A tolerance is a bound derived from float32's unit roundoff, the length of the reduction or
factorisation involved and the magnitude of the values, never the error one CPU happened to
produce: other CPUs (AVX-512, AMX, ARM), XLA versions and thread counts block and order
their sums differently, and a bound that holds only for one order is a coin toss elsewhere.

- `U32`: unit roundoff of float32 (2^-24); `U_BF16` of bfloat16 (2^-8: 8 significant bits).
- Worst case (Higham, Accuracy and Stability, Thm 3.1/Lemma 3.1): a sum of n terms computed
  in any order is within `gamma(n - 1) * sum|x|` of the exact sum, gamma(k) = k u / (1 - k u).
- Probabilistic (Higham & Mary, SISC 2019, Thm 3.1): with rounding errors independent and
  mean zero, an n-term sum or dot product is within `lam * sqrt(n) * u * sum|x|` of exact
  with probability at least 1 - 2n exp(-lam^2 / 2); with lam = 8 that is 1 - 2.5e-14 n.
  Used where a computation is the same arithmetic in another order (layouts, processes),
  and chained through a network (`reorder_rtol`).

Every check goes through `check`, which asserts err <= bound and, with
REC_LLM_NUMERICS_REPORT=FILE set, appends {test, what, err, bound, ratio} to FILE as a
JSON line: `python -m benchmarks.numerics_shakeout` runs the numerical tests under several
XLA CPU settings and reports how close each check came to its bound.
"""

import json
import math
import os

import numpy as np

U32 = 2.0 ** -24
U_BF16 = 2.0 ** -8
LAM = 8.0


def gamma(k: int, u: float = U32) -> float:
  """Worst-case relative error factor of k successive roundings."""
  return k * u / (1 - k * u)


def prob(n: int, u: float = U32, lam: float = LAM) -> float:
  """Probabilistic error factor of an n-term sum (relative to the sum of |terms|)."""
  return lam * math.sqrt(max(n, 1)) * u


def reorder_rtol(reductions: int, depth: int = 1) -> float:
  """Relative tolerance between two evaluations of the same float32 computation whose
  reductions run in different orders (another mesh layout, another process count).

  `reductions` is the number of terms summed along the longest reduction that changes
  order (e.g. the vocabulary softmax), `depth` the number of such reductions chained one
  after another along the computation (blocks x steps): independent errors of the chain
  add in quadrature, each bounded by `prob(reductions)`. Valid where the compared values
  are sums without cancellation (losses) or norms over many entries (gradients, in
  relative norm), whose condition number is about 1."""
  return prob(reductions) * math.sqrt(depth)


def _record(what: str, err: float, bound: float) -> None:
  path = os.environ.get("REC_LLM_NUMERICS_REPORT")
  if not path:
    return
  rec = {"test": os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0], "what": what,
         "err": float(err), "bound": float(bound),
         "ratio": float(err / bound) if bound > 0 else (0.0 if err == 0 else math.inf)}
  with open(path, "a") as f:
    f.write(json.dumps(rec) + "\n")


def check(what: str, err, bound) -> None:
  """Asserts err <= bound elementwise (arrays broadcast) and records the worst ratio."""
  err, bound = np.broadcast_arrays(np.asarray(err, np.float64), np.asarray(bound, np.float64))
  ratio = np.where(bound > 0, err / np.where(bound > 0, bound, 1), np.where(err > 0, np.inf, 0))
  worst = np.unravel_index(np.argmax(ratio), ratio.shape) if ratio.size else ()
  _record(what, err[worst] if ratio.size else 0.0, bound[worst] if ratio.size else 0.0)
  bad = int((err > bound).sum())
  assert bad == 0, (f"{what}: {bad} of {err.size} entries exceed their error bound; worst at "
                    f"{tuple(int(i) for i in worst)}: error {err[worst]:.3e} > bound "
                    f"{bound[worst]:.3e}")


def check_close(what: str, actual, desired, bound) -> None:
  """|actual - desired| <= bound, elementwise."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, (what, actual.shape, desired.shape)
  check(what, np.abs(actual - desired), bound)


def check_rel(what: str, actual, desired, rtol: float) -> None:
  """Relative error in norm: ||actual - desired|| <= rtol * ||desired||."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, (what, actual.shape, desired.shape)
  check(what, np.linalg.norm(actual - desired), rtol * np.linalg.norm(desired))


def check_tree_rel(what: str, actual, desired, rtol: float) -> None:
  """`check_rel` on every leaf of two pytrees of arrays (gradients, parameters)."""
  import jax
  flat, _ = jax.tree_util.tree_flatten_with_path(actual)
  want = jax.tree.leaves(desired)
  assert len(flat) == len(want), what
  for (path, a), d in zip(flat, want):
    check_rel(f"{what} {jax.tree_util.keystr(path)}", a, d, rtol)


def ulp_perturbed(tree, seed: int = 0):
  """Every float32 entry of a pytree of arrays times (1 +- 2 U32: an ulp at 1), random signs:
  inputs that differ by about a rounding, to measure how far a computation's own
  conditioning carries one."""
  import jax
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (np.asarray(x, np.float32) * (
      1 + 2 * U32 * rng.choice(np.array([-1.0, 1.0]), np.shape(x)))).astype(np.float32), tree)


def max_tree_rel(actual, desired) -> float:
  """The largest per-leaf relative error in norm of two pytrees of arrays."""
  import jax
  return max(float(np.linalg.norm(np.asarray(a, np.float64) - np.asarray(d, np.float64))
                   / np.linalg.norm(np.asarray(d, np.float64)))
             for a, d in zip(jax.tree.leaves(actual), jax.tree.leaves(desired)))


def sum_bound(terms, axis=0):
  """Worst-case error of summing `terms` along `axis` in any order: gamma(n-1) sum|x|."""
  terms = np.asarray(terms, np.float64)
  return gamma(terms.shape[axis] - 1) * np.abs(terms).sum(axis)


def ring_codec_bound(stacked, levels: int, stochastic: bool, block: int) -> np.ndarray:
  """Bound on |ring mean - exact mean| per entry when a ring all-reduce carries quantised
  chunks (rec_llm.parallel.collectives.mean with a codec; `stacked` [n, m] is every
  replica's flat vector in the compressor's order).

  A ring encodes n partial sums of each chunk: after k = 1 .. n - 1 hops a sum over k
  replicas, and the finished sum over all n once more. Each encoding of a codec block
  (`block` entries sharing one scale max|block| / levels) errs by at most one level
  (stochastic rounding) or half a level (nearest) per entry. A partial sum over k
  replicas is at most the sum of the k largest |x_i| of its entry: S_k. The mean divides
  by n. Rounding of the float32 sums themselves is below this by orders of magnitude.
  """
  x = np.abs(np.asarray(stacked, np.float64))
  n, m = x.shape
  s = np.cumsum(-np.sort(-x, axis=0), axis=0)  # S_k per entry, k = 1..n
  pad = -m % block
  s = np.pad(s, ((0, 0), (0, pad))).reshape(n, -1, block).max(-1)  # per codec block
  per_level = (1.0 if stochastic else 0.5) / levels
  bound = np.repeat(s.sum(0), block)[:m] * per_level / n
  return bound + sum_bound(stacked) / n
