"""Next-item ranking metrics: HR@K, NDCG@K and MRR.

Full ranking (default): each held-out target is ranked against every item, with the item
table sharded over `tensor`; a device only scores its own rows and the target's rank is
summed across shards, so no [users, items] matrix ever exists. Ties rank the lower item id
first (the order of `lax.top_k`); a non-finite score never helps the target
(`vocab_parallel.ahead_of_target`), and metrics are refused for parameters that are not
finite (`TrainingError`). Items the user has already seen stay in the ranking by
default; `filter_seen` (`eval.filter_seen`) leaves out the items of the model's input window
(at most max_len, the target never), as the generative-recommenders evaluation does by
default (its `filter_invalid_ids`, whose reported SASRec / HSTU numbers are filtered). On
MovieLens, where no user rates a movie twice, filtering only removes wrong answers.

Sampled (`eval.num_negatives` > 0, the SASRec paper's protocol): the target is ranked
against that many items drawn uniformly from those the user has never interacted with.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rec_llm.data.split import left_pad
from rec_llm.errors import TrainingError
from rec_llm.numerics import nonfinite_leaves
from rec_llm.parallel import sharding, vocab_parallel


def metrics_from_ranks(ranks: np.ndarray, ks=(10, 50, 200)) -> dict[str, float]:
  """0-based ranks -> {'hr@K', 'ndcg@K', 'mrr'} averaged over users."""
  ranks = np.asarray(ranks, np.float64)
  out = {}
  for k in ks:
    hit = ranks < k
    out[f"hr@{k}"] = float(hit.mean())
    out[f"ndcg@{k}"] = float(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0).mean())
  out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
  return out


def sample_negatives(histories, targets, num_items: int, n: int, seed: int) -> np.ndarray:
  """[users, n] items each user never interacted with, uniform, seeded per user."""
  out = np.empty((len(targets), n), np.int32)
  for u, (hist, tgt) in enumerate(zip(histories, targets)):
    seen = set(hist.tolist()) | {int(tgt)}
    if num_items - len(seen) < n:
      raise ValueError(f"user {u} has seen {len(seen)} of {num_items} items: fewer than "
                       f"{n} negatives are left; lower eval.num_negatives")
    rng = np.random.default_rng([seed, u])
    picked = []
    while len(picked) < n:
      for c in rng.integers(1, num_items + 1, size=2 * n):
        if c not in seen:
          seen.add(int(c))
          picked.append(c)
          if len(picked) == n:
            break
    out[u] = picked
  return out


class Evaluator:
  """Ranks held-out targets for a source's 'val' or 'test' split."""

  def __init__(self, model, mesh: Mesh, source, max_len: int, batch_size: int,
               ks=(10, 50, 200), num_negatives: int = 0, seed: int = 0,
               filter_seen: bool = False):
    self.model, self.mesh, self.ks = model, mesh, tuple(ks)
    self.filter_seen = filter_seen
    self.max_len, self.batch_size = max_len, batch_size
    self.num_items, self.num_negatives = source.num_items, num_negatives
    self.source, self.seed = source, seed
    self._examples = {}
    self._jit_full = jax.jit(self._full_ranks, out_shardings=sharding.named(mesh, ("batch",)))
    self._jit_sampled = jax.jit(self._sampled_ranks, out_shardings=sharding.named(mesh, ("batch",)))

  def _last_hidden(self, params, inputs):
    hidden, table = self.model.apply({"params": params}, inputs)
    return hidden[:, -1:, :], table  # left-padded: the last position is the latest item

  def _full_ranks(self, params, inputs, targets):
    h, table = self._last_hidden(params, inputs)
    _, rank = vocab_parallel.softmax_xent(h, table, targets, self.num_items + 1,
                                          exclude=inputs if self.filter_seen else None)
    return rank[:, 0]

  def _sampled_ranks(self, params, inputs, targets):
    h, table = self._last_hidden(params, inputs)
    cand = vocab_parallel.embed_lookup(table, targets)  # [b, 1 + n, d]: target first
    scores = jnp.einsum("bd,bnd->bn", h[:, 0].astype(jnp.float32), cand.astype(jnp.float32))
    ahead = vocab_parallel.ahead_of_target(scores[:, 1:], targets[:, 1:], scores[:, :1],
                                           targets[:, :1])
    return ahead.sum(-1)

  def _prepare(self, split: str):
    if split not in self._examples:
      hist, targets = self.source.eval_examples(split)
      inputs = left_pad(hist, self.max_len)
      tg = targets[:, None]
      if self.num_negatives:
        negs = sample_negatives(hist, targets, self.num_items, self.num_negatives,
                                self.seed + (split == "test"))
        tg = np.concatenate([tg, negs], axis=1)
      n = len(targets)
      pad = -n % self.batch_size  # padded rows are scored and dropped
      self._examples[split] = (np.pad(inputs, ((0, pad), (0, 0))),
                               np.pad(tg, ((0, pad), (0, 0)), constant_values=1), n)
    return self._examples[split]

  def _global(self, arr):
    sh = sharding.named(self.mesh, ("batch",) + (None,) * (arr.ndim - 1))
    return jax.make_array_from_callback(arr.shape, sh, lambda idx: arr[idx])

  def ranks(self, params, split: str = "val") -> np.ndarray:
    inputs, targets, n = self._prepare(split)
    fn = self._jit_sampled if self.num_negatives else self._jit_full
    out = []
    with sharding.activate(self.mesh):
      for i in range(0, len(inputs), self.batch_size):
        sl = slice(i, i + self.batch_size)
        out.append(fn(params, self._global(inputs[sl]), self._global(targets[sl])))
    ranks = np.concatenate([np.asarray(multihost_utils.process_allgather(r, tiled=True))
                            for r in out])
    return ranks[:n]

  def evaluate(self, params, split: str = "val") -> dict[str, float]:
    """Metrics of `split`; refuses (TrainingError) parameters that are not finite."""
    bad = nonfinite_leaves(params)
    if bad:
      raise TrainingError(
          f"refusing to report {split} metrics: the parameters are not finite ("
          f"{', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''}); a checkpoint of "
          "finite values is never overwritten, so resume from it")
    return metrics_from_ranks(self.ranks(params, split), self.ks)

