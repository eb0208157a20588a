"""Held-out graph-guided steering (values.side_effects): splits, role choice blind to the
measurement items, the graph blind to the steering roles, and the expected - unexpected
contrast against random graphs on planted and structureless data."""
import json
import types

import numpy as np
import pytest

from configs import causal as causal_config
from valuedist.data import schwartz
from valuedist.studies import causal as causal_study
from valuedist.values import causal_graph, questionnaire, side_effects as se

VALUES = schwartz.VALUES
V = len(VALUES)
PLANTED = [(0, 1), (1, 2), (2, 3), (4, 5), (5, 6), (3, 7), (7, 8), (8, 9), (0, 4), (6, 9)]


def synthetic(seed: int, structured: bool = True, roles: int = 110, per: int = 7, w: float = 0.7):
  """(items [1 + roles, V * per] expected answers, item values [I], true skeleton [V, V]).

  Structured: each role pushes one value (plus small noise on all), and a push moves the value's
  planted neighbours by +-w and nothing else (x = e + e W, W symmetric on a shuffled planted
  skeleton, random signs). Unstructured: every value moves independently at random. Row 0 (no role) is x = 0."""
  rng = np.random.default_rng(seed)
  order = rng.permutation(V)
  weight = np.zeros((V, V))
  for a, b in PLANTED:
    weight[order[a], order[b]] = weight[order[b], order[a]] = w * rng.choice([-1.0, 1.0])
  e = rng.normal(0, 0.3, (roles, V))
  e[np.arange(roles), rng.integers(0, V, roles)] += rng.uniform(1, 2, roles)
  x = e + e @ weight if structured else rng.normal(0, 1, (roles, V)) * rng.uniform(0.2, 1.5, (roles, 1))
  x = np.vstack([np.zeros(V), x])
  items = 3.5 + 0.5 * x[:, np.repeat(np.arange(V), per)] + rng.normal(0, 0.1, (roles + 1, V * per))
  return items, list(np.repeat(VALUES, per)), weight != 0


def _pct(out):
  (entry,) = [e for e in out["comparisons"] if e["metric"] == se.METRIC]
  assert set(entry) == set(causal_graph.ENTRY_KEYS)
  return entry


# ----------------------------------------------------------------------------- splits and blindness

def test_splits_are_disjoint_stratified_and_seeded():
  a, b = se.split_roles(11, seed=3)
  assert len(a) == 6 and len(b) == 5 and not set(a) & set(b) and set(a) | set(b) == set(range(1, 12))
  a2, b2 = se.split_roles(11, seed=3)
  assert a.tolist() == a2.tolist() and b.tolist() == b2.tolist()
  assert any(se.split_roles(11, seed=s)[0].tolist() != a.tolist() for s in range(4, 8))
  iv = list(np.repeat(VALUES, 7))
  sel, mea = se.split_items(iv, seed=3)
  assert not set(sel) & set(mea) and sorted(set(sel) | set(mea)) == list(range(len(iv)))
  for v in VALUES:                                            # every value in both halves: 3 select, 4 measure
    assert sum(iv[i] == v for i in sel) == 3 and sum(iv[i] == v for i in mea) == 4
  assert se.split_items(iv, seed=3)[0].tolist() == sel.tolist()
  assert any(se.split_items(iv, seed=s)[0].tolist() != sel.tolist() for s in range(4, 8))
  with pytest.raises(ValueError, match="at least 2 per value"):
    se.split_items(["power", "power", "security"], seed=0)


def test_choice_never_reads_the_measurement_items():
  items, iv, _ = synthetic(0)
  _, half_b = se.split_roles(len(items) - 1, seed=0)
  sel, mea = se.split_items(iv, seed=0)
  chosen, rise = se.choose_roles(items, half_b, sel, iv, VALUES)
  blind = items.copy()
  blind[:, mea] = np.nan                                      # any read of item half 2 would show up as nan
  c2, r2 = se.choose_roles(blind, half_b, sel, iv, VALUES)
  assert c2.tolist() == chosen.tolist() and np.allclose(r2, rise)
  decoy = items.copy()                                        # a role that looks best for power only on half 2
  p = VALUES.index("power")
  cols = [j for j in mea if iv[j] == "power"]
  row = next(r for r in half_b if r != chosen[p])
  decoy[row, cols] += 3.0
  assert se.choose_roles(decoy, half_b, sel, iv, VALUES)[0].tolist() == chosen.tolist()
  full = questionnaire.value_scores(decoy[np.concatenate([[0], half_b])], iv)
  assert half_b[np.argmax(full[1:, p] - full[0, p])] == row   # ...as choosing on all items would have found


def test_graph_is_learnt_from_half_a_only_and_roles_chosen_from_half_b():
  items, iv, _ = synthetic(1)
  out = se.graph_steering(items, iv, VALUES, alpha=0.05, seed=1, n_null=50, n_boot=20)
  half_b = out["design"]["steering_rows"]
  assert not set(half_b) & set(out["design"]["graph_rows"])
  assert {e["row"] for e in out["targets"]} <= set(half_b)
  moved = items.copy()
  moved[half_b] = np.random.default_rng(9).normal(3.5, 2.0, moved[half_b].shape)
  assert se.graph_steering(moved, iv, VALUES, alpha=0.05, seed=1, n_null=50, n_boot=20)["graph"] == out["graph"]


# ----------------------------------------------------------------------------- the contrast

def test_contrast_by_hand():
  g = np.zeros((4, 4), np.int8)
  g[0, 1], g[1, 0] = -1, 1                                    # 0 -> 1, and 2 - 3 undirected
  g[2, 3] = g[3, 2] = -1
  d = np.asarray([[9.0, 0.6, 0.2, 0.1], [0.5, 9.0, 0.1, 0.3], [0.0, 0.0, 9.0, 0.0], [0.4, 0.4, 0.2, 9.0]])
  exp_, unexp = se.contrast(d, causal_graph.skeleton(g))
  np.testing.assert_allclose(exp_, [0.6, 0.5, 0.0, 0.2])
  np.testing.assert_allclose(unexp, [0.15, 0.2, 0.0, 0.4])
  assert se.mean_difference(exp_, unexp) == pytest.approx(np.mean([0.45, 0.3, 0.0, -0.2]))
  exp_, unexp = se.contrast(d, np.zeros((4, 4), bool))        # no neighbours: undefined, not zero
  assert np.isnan(exp_).all() and np.isnan(se.mean_difference(exp_, unexp))
  t = se.graph_test(d, np.zeros((4, 4), np.int8), n_null=20, n_boot=20, seed=0)
  assert t["entry"]["observed"] is None and t["entry"]["null_percentile"] is None


@pytest.mark.parametrize("seed", range(5))
def test_planted_graph_beats_random_graphs(seed):
  items, iv, sk = synthetic(seed)
  out = se.graph_steering(items, iv, VALUES, alpha=0.05, seed=seed, n_null=1000, n_boot=200)
  e = _pct(out)
  assert e["null_percentile"] > 95 and e["observed"] > e["null_interval"][1] and e["ci"][0] > 0
  assert abs(e["chance"]) < 0.05 and out["mean"]["difference"] == pytest.approx(e["observed"], abs=1e-6)
  found = causal_graph.skeleton(np.asarray(out["graph"]))
  assert (found & sk).sum() >= 0.6 * sk.sum()                 # PC on half A recovers most planted edges
  chosen, _ = se.choose_roles(items, np.asarray(out["design"]["steering_rows"]),
                              np.asarray(out["design"]["selection_items"]), iv, VALUES)
  held = se.value_deltas(items, chosen, np.asarray(out["design"]["measurement_items"]), iv, VALUES)
  true = se.graph_test(np.abs(held), sk.astype(np.int8), n_null=1000, n_boot=200, seed=seed)["entry"]
  assert true["null_percentile"] > 95


def test_no_structure_is_not_extreme_across_seeds():
  pct, true_pct = [], []
  for seed in range(20):
    items, iv, sk = synthetic(seed, structured=False)
    out = se.graph_steering(items, iv, VALUES, alpha=0.05, seed=seed, n_null=400, n_boot=50)
    if _pct(out)["null_percentile"] is not None:
      pct.append(_pct(out)["null_percentile"])
    chosen, _ = se.choose_roles(items, np.asarray(out["design"]["steering_rows"]),
                                np.asarray(out["design"]["selection_items"]), iv, VALUES)
    held = se.value_deltas(items, chosen, np.asarray(out["design"]["measurement_items"]), iv, VALUES)
    true_pct.append(se.graph_test(np.abs(held), sk.astype(np.int8), n_null=400, n_boot=50, seed=seed)
                    ["entry"]["null_percentile"])
  for p in (np.asarray(pct), np.asarray(true_pct)):
    assert len(p) >= 15 and 25 < p.mean() < 75 and np.mean(p > 95) <= 0.2 and np.mean(p < 5) <= 0.2


def test_untestable_inputs_are_skipped_with_a_reason():
  items, iv, _ = synthetic(0, roles=14)
  out = se.graph_steering(items, iv, VALUES, alpha=0.05, seed=0, n_null=20, n_boot=20)
  assert "too few rows" in out["skipped"] and "targets" not in out
  items, iv, _ = synthetic(0, per=1)
  out = se.graph_steering(items, iv, VALUES, alpha=0.05, seed=0, n_null=20, n_boot=20)
  assert "fewer than 2 items" in out["skipped"] and "targets" not in out
  json.dumps(out, allow_nan=False)


# ----------------------------------------------------------------------------- summary

def _study_inputs(n_roles: int, per: int = 7):
  items = [{"id": f"{v}-{k}", "value": v} for v in VALUES for k in range(per)]
  return types.SimpleNamespace(items=items, roles=[{"id": f"role-{r:03d}"} for r in range(1, n_roles + 1)])


def test_study_summary_fields_are_json_and_named():
  items, iv, _ = synthetic(2)
  inputs = _study_inputs(len(items) - 1)
  c = causal_config.get_config()
  c.null_draws, c.bootstrap = 200, 50
  scores = questionnaire.value_scores(items, iv)
  g = causal_graph.pc_graph(scores, c.alpha)
  s = causal_study.role_steering(items, scores, g, inputs, c)
  json.dumps(s, allow_nan=False)
  assert set(s["role_steering"]) == set(VALUES) and all(e["in_sample"] for e in s["role_steering"].values())
  h = s["graph_steering"]
  assert {e["target"] for e in h["targets"]} == set(VALUES) and all(e["role"] in h["design"]["steering_roles"]
                                                                     for e in h["targets"])
  assert not set(h["design"]["graph_roles"]) & set(h["design"]["steering_roles"])
  assert not set(h["design"]["selection_items"]) & set(h["design"]["measurement_items"])
  assert h["design"]["seed"] == c.seed
  agree, paired = h["comparisons"]
  assert set(agree) == set(causal_graph.ENTRY_KEYS) and agree["null_percentile"] > 95
  assert set(paired) == {"metric", "treatment", "control", "estimate", "ci", "p", "p_holm", "n", "paired"}
  assert paired["paired"] and paired["n"] == h["mean"]["targets"] and paired["estimate"] > 0 and paired["p_holm"] < 0.05
  assert paired["estimate"] == pytest.approx(h["mean"]["difference"], abs=1e-5)


def test_too_few_roles_is_skipped_with_a_reason():
  items, iv, _ = synthetic(0, roles=14)
  c = causal_config.get_config()
  scores = questionnaire.value_scores(items, iv)
  s = causal_study.role_steering(items, scores, np.zeros((V, V), np.int8), _study_inputs(14), c)
  json.dumps(s, allow_nan=False)
  assert "too few rows" in s["graph_steering"]["skipped"] and len(s["graph_steering"]["design"]["graph_roles"]) == 7
