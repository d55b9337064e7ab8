"""Ranking metrics against brute-force numpy, ties included; sharded evaluation vs one device."""

import jax
import numpy as np
import pytest

from rec_llm.data.split import leave_one_out, TrainWindows
from rec_llm.eval.ranking import Evaluator, metrics_from_ranks, sample_negatives
from rec_llm.parallel import mesh as mesh_lib
from rec_llm.parallel import sharding, vocab_parallel
from rec_llm.train import trainer
from tests import numerics
from tests.helpers import LAYOUT_RTOL, tiny_config

KS = (10, 50, 200)


def _tied_problem(seed=0, users=24, vocab=256, num_valid=230, d=4):
  """Scores with many exact ties: duplicated table rows and small-integer values."""
  rng = np.random.default_rng(seed)
  base = rng.integers(-2, 3, size=(vocab // 4, d)).astype(np.float32)
  table = np.repeat(base, 4, axis=0)  # every item has three exact twins
  hidden = rng.integers(-2, 3, size=(users, d)).astype(np.float32)
  targets = rng.integers(1, num_valid, size=users).astype(np.int32)
  return hidden, table, targets, num_valid


def _seen(targets, num_valid, n=40, seed=0):
  """[users, n] seen-item lists: padding 0s, repeats, and for some users the target itself."""
  rng = np.random.default_rng(seed)
  seen = rng.integers(0, num_valid, size=(len(targets), n)).astype(np.int32)
  seen[::3, 0] = targets[::3]
  seen[:, 1] = seen[:, 2]
  return seen


def _brute_force(hidden, table, targets, num_valid, seen=None):
  """Sort every valid item by score (descending; ties by lower id) and read metrics off the
  list; with `seen`, a user's seen items other than the target are first taken out of it."""
  scores = hidden @ table.T
  out = {f"{m}@{k}": [] for k in KS for m in ("hr", "ndcg")}
  out["mrr"], ranks = [], []
  for u, (s, t) in enumerate(zip(scores, targets)):
    items = np.arange(1, num_valid)
    if seen is not None:
      items = items[~np.isin(items, seen[u]) | (items == t)]
    order = items[np.lexsort((items, -s[items]))]
    pos = int(np.flatnonzero(order == t)[0])
    ranks.append(pos)
    for k in KS:
      out[f"hr@{k}"].append(float(t in order[:k]))
      out[f"ndcg@{k}"].append(1.0 / np.log2(pos + 2) if pos < k else 0.0)
    out["mrr"].append(1.0 / (pos + 1))
  return np.array(ranks), {k: float(np.mean(v)) for k, v in out.items()}


@pytest.mark.parametrize("filter_seen", [False, True])
@pytest.mark.parametrize("data,tensor", [(1, 1), (2, 4), (1, 8)])
def test_full_ranking_metrics_equal_brute_force_with_ties(data, tensor, filter_seen):
  hidden, table, targets, num_valid = _tied_problem()
  seen = _seen(targets, num_valid) if filter_seen else None
  want_ranks, want = _brute_force(hidden, table, targets, num_valid, seen)
  mesh = mesh_lib.build_mesh(dict(data=data, tensor=tensor, pipe=1), jax.devices()[: data * tensor])
  with sharding.activate(mesh):
    _, rank = jax.jit(vocab_parallel.softmax_xent, static_argnums=3)(
        hidden[:, None], table, targets[:, None], num_valid, seen)
  ranks = np.asarray(rank)[:, 0]
  np.testing.assert_array_equal(ranks, want_ranks)
  got = metrics_from_ranks(ranks, KS)
  assert got.keys() == want.keys()
  for k in want:
    assert got[k] == pytest.approx(want[k], abs=1e-12), k  # small integers: exact scores


def _rule_ranks(scores, targets, num_valid, seen=None):
  """The rank definition (vocab_parallel.ahead_of_target) by brute force in float64: items
  1..num_valid-1 other than the target (and, with `seen`, other than the user's seen
  items) that score higher, score equal with a lower id, or have a non-finite score; all
  of them when the target's own score is not finite."""
  ranks = []
  for u, t in enumerate(targets):
    items = np.arange(1, num_valid)
    keep = items != t
    if seen is not None:
      keep &= ~np.isin(items, seen[u])
    s, st = scores[u, items[keep]], scores[u, t]
    ahead = (~np.isfinite(s) | (not np.isfinite(st)) | (s > st) | ((s == st) &
                                                                  (items[keep] < t)))
    ranks.append(int(ahead.sum()))
  return np.array(ranks)


def _nonfinite_problem():
  """The tied problem with NaN and +-inf scores in every position: items whose rows give
  NaN, +inf or -inf scores, users whose every score is NaN or infinite (their target's
  too), targets whose own row is NaN, and NaN / inf in the table's padding rows (id 0 and
  the rows past num_valid), which must change nothing."""
  hidden, table, targets, num_valid = _tied_problem()
  table, hidden = table.copy(), hidden.copy()
  hidden[:, 0] = np.where(hidden[:, 0] == 0, 1, hidden[:, 0])  # inf * 0 stays rare
  table[[5, 77]] = np.nan                       # NaN for every user
  table[[9, 130]] = [np.inf, 0, 0, 0]           # +inf or -inf by the sign of hidden[:, 0]
  table[[0, num_valid, num_valid + 3]] = np.nan  # padding rows
  table[num_valid + 1] = np.inf
  hidden[3] = np.nan                            # a user whose every score is NaN
  hidden[7, 1] = -np.inf                        # a user with infinite scores
  targets = targets.copy()
  targets[[10, 11]] = [5, 9]                    # targets whose own score is not finite
  return hidden, table, targets, num_valid


@pytest.mark.parametrize("filter_seen", [False, True])
@pytest.mark.parametrize("data,tensor", [(1, 1), (2, 4), (1, 8)])
def test_nonfinite_scores_never_help_the_target(data, tensor, filter_seen):
  hidden, table, targets, num_valid = _nonfinite_problem()
  seen = _seen(targets, num_valid) if filter_seen else None
  with np.errstate(invalid="ignore"):
    scores = hidden.astype(np.float64) @ table.astype(np.float64).T
  assert (~np.isfinite(scores[:, 1:num_valid])).any(1).all()  # every user meets one
  want = _rule_ranks(scores, targets, num_valid, seen)
  mesh = mesh_lib.build_mesh(dict(data=data, tensor=tensor, pipe=1), jax.devices()[: data * tensor])
  with sharding.activate(mesh):
    _, rank = jax.jit(vocab_parallel.softmax_xent, static_argnums=3)(
        hidden[:, None], table, targets[:, None], num_valid, seen)
  got = np.asarray(rank)[:, 0]
  np.testing.assert_array_equal(got, want)
  # Users whose scores are all non-finite rank their target last.
  last = num_valid - 2 - (0 if seen is None else np.array(
      [len(set(s) - {0, t}) for s, t in zip(seen, targets)]))
  for u in (3, 7, 10, 11):
    assert got[u] == (last if seen is None else last[u]), u
  m = metrics_from_ranks(got, KS)
  assert all(np.isfinite(v) and 0 <= v <= 1 for v in m.values())


def test_sampled_ranks_count_nonfinite_scores_against_the_target():
  """The sampled protocol's ranks ([users, 1 + negatives] scores, target first)."""
  scores = np.array([[1.0, 2.0, 0.0, 0.5], [np.nan, 0.0, 1.0, 2.0], [3.0, np.inf, 0.0, 1.0],
                     [3.0, -np.inf, np.nan, 1.0], [np.inf, 1.0, 2.0, 3.0]], np.float32)
  ids = np.array([[4, 1, 2, 3]] * 5, np.int32)
  got = jax.jit(vocab_parallel.ahead_of_target)(scores[:, 1:], ids[:, 1:], scores[:, :1],
                                                ids[:, :1]).sum(-1)
  np.testing.assert_array_equal(got, [1, 3, 1, 2, 3])


def test_ties_really_occur_in_the_problem():
  hidden, table, targets, num_valid = _tied_problem()
  scores = hidden @ table.T
  t = scores[np.arange(len(targets)), targets]
  ties = ((scores[:, 1:num_valid] == t[:, None]).sum(1) - 1)
  assert (ties >= 3).all()  # each target has at least its three twins tied with it


def test_sharded_top_k_equals_dense_top_k_with_ties():
  hidden, table, _, num_valid = _tied_problem(1)
  mesh = mesh_lib.build_mesh(dict(data=2, tensor=4, pipe=1))
  with sharding.activate(mesh):
    scores, ids = jax.jit(vocab_parallel.top_k, static_argnums=(2, 3))(hidden, table, 20, num_valid)
  dense = hidden @ table.T
  dense[:, 0] = -np.inf
  dense[:, num_valid:] = -np.inf
  want_s, want_i = jax.lax.top_k(dense, 20)
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(want_i))
  np.testing.assert_array_equal(np.asarray(scores), np.asarray(want_s))


def test_sampled_negatives_are_unseen_and_seeded():
  hist = [np.array([1, 2, 3]), np.array([4, 5])]
  targets = np.array([6, 7])
  negs = sample_negatives(hist, targets, 50, 20, seed=0)
  assert negs.shape == (2, 20)
  for h, t, n in zip(hist, targets, negs):
    assert not set(n) & (set(h) | {t}) and len(set(n)) == 20 and n.min() >= 1 and n.max() <= 50
  np.testing.assert_array_equal(negs, sample_negatives(hist, targets, 50, 20, seed=0))
  with pytest.raises(ValueError, match="fewer than"):
    sample_negatives(hist, targets, 10, 8, seed=0)


def _near_ties(run, inputs, targets):
  """Per user, the number of items whose score may fall on either side of the target's.

  Scores are float32 dot products of the last hidden state with each item row; another
  layout (or numpy) computes the hidden state to within LAYOUT_RTOL in norm and each dot
  product to within prob(d) sum|h_i t_i|, so a score errs by at most
  (LAYOUT_RTOL + prob(d)) ||h|| ||t_v||. An item closer than both errors to the target
  can rank on either side of it; no other item can change the rank.
  """
  hidden, table = run.model.apply({"params": jax.device_get(run.state.params)}, inputs)
  h = np.asarray(hidden[:, -1], np.float64)
  t = np.asarray(table, np.float64)
  s = h @ t.T
  err = (LAYOUT_RTOL + numerics.prob(h.shape[1])) * np.outer(np.linalg.norm(h, axis=1),
                                                             np.linalg.norm(t, axis=1))
  rows = np.arange(len(targets))
  gap = np.abs(s - s[rows, targets][:, None])
  near = gap <= err + err[rows, targets][:, None]
  near[:, 0] = False
  near[:, run.model_cfg.num_items + 1:] = False
  return near.sum(1) - 1  # the target is near itself


def _check_ranks(got, want, near):
  """Ranks equal but for near-ties: |got - want| <= the user's near-tie count."""
  moved = np.abs(np.asarray(got, np.int64) - np.asarray(want, np.int64))
  numerics.check("rank changes beyond near-ties", moved, near)


def _trained_run(data, tensor):
  c = tiny_config(data=data, tensor=tensor)
  c.data.eval_users = 40
  return trainer.build(c, jax.devices()[: data * tensor])


@pytest.mark.parametrize("negatives,filter_seen", [(0, False), (0, True), (30, False)])
def test_sharded_evaluation_matches_single_device(negatives, filter_seen):
  ref, run = _trained_run(1, 1), _trained_run(4, 2)
  ev = lambda r: Evaluator(r.model, r.mesh, r.source, r.model_cfg.max_len, 16, KS, negatives, 0,
                           filter_seen=filter_seen)
  want = ev(ref).ranks(ref.state.params, "test")
  got = ev(run).ranks(run.state.params, "test")
  assert len(got) == 40  # padded rows dropped
  inputs, targets, n = ev(ref)._prepare("test")
  _check_ranks(got, want, _near_ties(ref, inputs[:n], targets[:n, 0]))
  if negatives:
    assert got.max() <= negatives
  if filter_seen:  # taking seen items out can only move a target up, and here it does
    kept = Evaluator(run.model, run.mesh, run.source, run.model_cfg.max_len, 16, KS, 0, 0)
    unfiltered = kept.ranks(run.state.params, "test")
    assert (got <= unfiltered).all() and (got < unfiltered).any()


def test_sampled_ranks_equal_brute_force():
  run = _trained_run(2, 4)
  ev = Evaluator(run.model, run.mesh, run.source, run.model_cfg.max_len, 16, KS, 30, 0)
  ranks = ev.ranks(run.state.params, "val")
  inputs, cands, n = ev._prepare("val")
  hidden, table = run.model.apply({"params": jax.device_get(run.state.params)}, inputs[:n])
  s = np.einsum("bd,bnd->bn", np.asarray(hidden[:, -1]), np.asarray(table)[cands[:n]])
  ids = cands[:n]
  want = ((s[:, 1:] > s[:, :1]) | ((s[:, 1:] == s[:, :1]) & (ids[:, 1:] < ids[:, :1]))).sum(1)
  _check_ranks(ranks, want, _near_ties(run, inputs[:n], cands[:n, 0]))


def test_leave_one_out_and_epoch_windows():
  seqs = [np.arange(1, 8), np.array([3, 4]), np.array([5, 6, 7])]
  loo = leave_one_out(seqs, 10)
  np.testing.assert_array_equal(loo.eval_users, [0, 2])
  np.testing.assert_array_equal(loo.train[0], [1, 2, 3, 4, 5])
  hist, tg = loo.eval_examples("val")
  np.testing.assert_array_equal(tg, [6, 6])
  np.testing.assert_array_equal(hist[0], [1, 2, 3, 4, 5])
  hist, tg = loo.eval_examples("test")
  np.testing.assert_array_equal(tg, [7, 7])
  np.testing.assert_array_equal(hist[1], [5, 6])
  w = TrainWindows(loo.train, 10, seq_len=4, batch_size=2, seed=0)
  assert list(w.users) == [0, 1]  # user 2 has one training item: no (input, target) pair
  epoch = np.concatenate([w.rows(0, 0, 2)])
  assert sorted(map(tuple, epoch)) == sorted([(2, 3, 4, 5), (0, 0, 3, 4)])
  np.testing.assert_array_equal(w.rows(3, 0, 2), TrainWindows(loo.train, 10, 4, 2, 0).rows(3, 0, 2))
