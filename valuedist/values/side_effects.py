"""Graph-guided steering tested out of sample (the published "Table 2" form): when a role moves
a target value, do the values the causal graph connects to the target move more than the
others, and more than under random graphs of the same size?

Shapes: S = 1 + R rows of per-item expected answers (row 0 = no-role baseline, rows 1..R =
roles), I items, V values (targets are the V values, in order), n null draws.

Design (no figure is scored on the data that chose it; STUDY_PROTOCOL rule 1):
  roles    rows 1..R are permuted (seed) and cut in two: half A (ceil(R/2) roles) plus the
           baseline row are the only rows the PC graph under test is learnt from (value scores
           over all items); half B's floor(R/2) roles are the only steering candidates.
  items    each value's items are permuted (seed) and cut in two, so both halves hold every
           value: floor(n/2) 'selection' items (item half 1), the rest 'measurement' items
           (item half 2). Value scores are recomputed (row-centred) on each half alone.
  choice   for target t: the half-B role whose value score of t rises most above the baseline's
           on item half 1 (roles are meant to promote a value, so 'intended' = up); ties go to
           the earlier row. Non-target changes are not looked at, and item half 2 is never read.
  measure  on item half 2, delta = the chosen role's value scores minus the baseline's.
           expected(t) = mean |delta| over t's neighbours in the graph's skeleton (any edge
           type: the values connected to t); unexpected(t) = mean |delta| over the other
           non-target values; difference = expected - unexpected. A target with no neighbour
           (or no non-neighbour) is undefined and left out of the averages.
           Value scores are row-centred (`questionnaire.value_scores`), so a change is relative to
           the role's own mean answer: a role that raises every answer alike moves no value.
  chance   the same mean difference under n uniformly random skeletons with as many edges as
           the graph (chosen roles and their deltas fixed); ci: percentile bootstrap over the
           defined targets (one difference per target, resampled with replacement).
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from valuedist.values import causal_graph, questionnaire

ROLE_STREAM, ITEM_STREAM, NULL_STREAM, BOOT_STREAM = 0, 1, 2, 3   # independent seeded streams
METRIC = "graph_steering_expected_minus_unexpected"


def split_roles(n_roles: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """-> (half A, half B): sorted row indices into the [1 + R, I] matrix (rows 1..R, baseline
  row 0 in neither); A has ceil(R/2) roles (graph), B floor(R/2) (steering). Same seed, same split."""
  if n_roles < 2:
    raise ValueError(f"{n_roles} roles cannot be split into a graph half and a steering half; add roles")
  perm = 1 + np.random.default_rng([seed, ROLE_STREAM]).permutation(n_roles)
  k = n_roles - n_roles // 2
  return np.sort(perm[:k]), np.sort(perm[k:])


def split_items(item_values: Sequence[str], seed: int) -> tuple[np.ndarray, np.ndarray]:
  """item_values [I] -> (selection, measurement): sorted item indices, split within each value
  (floor(n/2) of a value's n items select, the rest measure). Same seed, same split."""
  iv = np.asarray(item_values)
  rng = np.random.default_rng([seed, ITEM_STREAM])
  sel, mea = [], []
  for v in sorted(set(iv.tolist())):
    idx = np.flatnonzero(iv == v)
    if len(idx) < 2:
      raise ValueError(f"value {v!r} has {len(idx)} item; splitting items into selection and measurement halves "
                       "needs at least 2 per value")
    idx = rng.permutation(idx)
    sel.append(idx[:len(idx) // 2])
    mea.append(idx[len(idx) // 2:])
  return np.sort(np.concatenate(sel)), np.sort(np.concatenate(mea))


def value_deltas(items: np.ndarray, rows: np.ndarray, cols: np.ndarray, item_values: Sequence[str],
                 values: Sequence[str]) -> np.ndarray:
  """items [S, I] -> [len(rows), V]: value scores of `rows` minus row 0's, from columns `cols` only."""
  sub = np.asarray(items, np.float64)[np.ix_(np.concatenate([[0], rows]), cols)]
  vs = questionnaire.value_scores(sub, np.asarray(item_values)[cols], values)
  return vs[1:] - vs[0]


def choose_roles(items: np.ndarray, rows: np.ndarray, selection: np.ndarray, item_values: Sequence[str],
                 values: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
  """-> (chosen row [V], its selection change [V]): per target t, the row of `rows` whose score of
  t rises most over the baseline on the selection items (reads only items[:, selection])."""
  d = value_deltas(items, rows, selection, item_values, values)
  best = np.argmax(d, axis=0)
  return np.asarray(rows)[best], d[best, np.arange(d.shape[1])]


def adjacency(pairs: np.ndarray, v: int) -> np.ndarray:
  """Skeleton pairs [..., V(V-1)/2] bool (upper-triangle order) -> symmetric adjacency [..., V, V]."""
  pairs = np.asarray(pairs, bool)
  iu = np.triu_indices(v, 1)
  out = np.zeros(pairs.shape[:-1] + (v, v), bool)
  out[..., iu[0], iu[1]] = pairs
  return out | np.swapaxes(out, -1, -2)


def contrast(abs_delta: np.ndarray, adj: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """abs_delta [V, V] (row t: |value changes| under target t's role), adj [..., V, V] bool ->
  (expected [..., V], unexpected [..., V]): row t's mean over t's neighbours / over the other
  non-target values; nan where that set is empty."""
  v = abs_delta.shape[0]
  eye = np.eye(v, dtype=bool)
  near = np.asarray(adj, bool) & ~eye
  far = ~near & ~eye

  def mean(m):
    k = m.sum(-1)
    return np.where(k > 0, (m * abs_delta).sum(-1) / np.maximum(k, 1), np.nan)
  return mean(near), mean(far)


def mean_difference(expected: np.ndarray, unexpected: np.ndarray) -> np.ndarray:
  """[..., V] -> [...]: mean of expected - unexpected over the defined targets (nan if none)."""
  d = expected - unexpected
  ok = np.isfinite(d)
  return np.where(ok.any(-1), np.where(ok, d, 0).sum(-1) / np.maximum(ok.sum(-1), 1), np.nan)


def graph_test(abs_delta: np.ndarray, g: np.ndarray, *, n_null: int, n_boot: int, seed: int) -> dict:
  """abs_delta [V, V] (|held-out changes| under each target's chosen role), g [V, V] a graph ->
  {'expected', 'unexpected', 'difference': [V] (nan = undefined), 'entry': the rule-13 agreement
  entry of the mean difference against n_null random skeletons with as many edges}."""
  v = abs_delta.shape[0]
  sk = causal_graph.skeleton(g)
  exp_, unexp = contrast(abs_delta, sk)
  diff = exp_ - unexp
  observed = float(mean_difference(exp_, unexp))
  k = int(sk[np.triu_indices(v, 1)].sum())
  rng_null, rng_boot = (np.random.default_rng([seed, s]) for s in (NULL_STREAM, BOOT_STREAM))
  null = mean_difference(*contrast(abs_delta, adjacency(
      causal_graph.random_skeletons(v * (v - 1) // 2, k, n_null, rng_null), v)))
  ok = diff[np.isfinite(diff)]
  boot = ok[rng_boot.integers(0, len(ok), (n_boot, len(ok)))].mean(1) if ok.size else None
  entry = causal_graph.chance_entry(METRIC, observed, null, boot)
  return {"expected": exp_, "unexpected": unexp, "difference": diff, "entry": entry, "edges": k}


def _finite(x) -> float | None:
  return round(float(x), 6) if np.isfinite(x) else None


def graph_steering(items: np.ndarray, item_values: Sequence[str], values: Sequence[str], *, alpha: float, seed: int,
                   n_null: int = 1000, n_boot: int = 1000) -> dict:
  """The held-out test of the module docstring on expected answers items [1 + R, I] (row 0 = baseline).

  Returns (JSON-serialisable; rows index items, i.e. role r is row r, items index columns):
    design       seed, graph_rows (half A), steering_rows (half B), selection_items, measurement_items
    skipped      the reason, only when there is no test: half A (+ baseline) has no more rows than values or
                 a constant value, or a value has fewer than 2 items; nothing below is then given
    graph        [V, V] PC graph (alpha) of half A + baseline value scores; edges: its skeleton's edge count
    targets      per value: target, row (chosen role), selection_change (t's rise on item half 1),
                 target_change (t's held-out change), expected_values (t's graph neighbours), expected,
                 unexpected, difference (None where undefined)
    mean         expected, unexpected, difference: means over the `targets` defined targets
    comparisons  [the agreement entry (causal_graph.ENTRY_KEYS) of the mean difference]
    null         how chance and ci were drawn"""
  items = np.asarray(items, np.float64)
  half_a, half_b = split_roles(len(items) - 1, seed)
  few = [v for v in values if list(item_values).count(v) < 2]
  sel, mea = split_items(item_values, seed) if not few else (np.zeros(0, int), np.zeros(0, int))
  out = {"design": {"seed": seed, "graph_rows": half_a.tolist(), "steering_rows": half_b.tolist(),
                    "selection_items": sel.tolist(), "measurement_items": mea.tolist()}}
  if few:
    return dict(out, skipped=f"value {few[0]!r} has fewer than 2 items: no selection / measurement split; add items")
  if len(half_a) + 1 <= len(values):
    return dict(out, skipped=f"half A has {len(half_a)} roles + baseline for {len(values)} values: too few rows for "
                             "a PC graph; add roles")
  scores_a = questionnaire.value_scores(items[np.concatenate([[0], half_a])], item_values, values)
  try:
    causal_graph.check_scores(scores_a, values)
  except ValueError as err:                                           # e.g. a value constant across half A
    return dict(out, skipped=f"half A: {err}")
  g = causal_graph.pc_graph(scores_a, alpha)
  chosen, rise = choose_roles(items, half_b, sel, item_values, values)
  held = value_deltas(items, chosen, mea, item_values, values)         # [V, V]: row t under t's chosen role
  t = graph_test(np.abs(held), g, n_null=n_null, n_boot=n_boot, seed=seed)
  sk = causal_graph.skeleton(g)
  ok = np.isfinite(t["difference"])
  out["targets"] = [{"target": v, "row": int(chosen[i]), "selection_change": _finite(rise[i]),
                     "target_change": _finite(held[i, i]),
                     "expected_values": [values[j] for j in np.flatnonzero(sk[i]) if j != i],
                     **{k: _finite(t[k][i]) for k in ("expected", "unexpected", "difference")}}
                    for i, v in enumerate(values)]
  out["mean"] = {k: _finite(t[k][ok].mean()) if ok.any() else None for k in ("expected", "unexpected", "difference")}
  out["mean"]["targets"] = int(ok.sum())
  out.update(graph=g.tolist(), edges=t["edges"], comparisons=[t["entry"]],
             null={"n_null": n_null, "n_boot": n_boot, "seed": seed,
                   "graph": f"uniformly random skeletons with {t['edges']} edges; chosen roles and deltas fixed",
                   "ci": "percentile bootstrap over the defined targets"})
  return out
