"""Causal value structure: PC graphs among the 10 values (from `questionnaire` value scores)
with bootstrap edge stability, agreement with the human (circumplex) structure, and
predicted vs observed side effects of steering.

Shapes: R roles (row 0 may be the no-role baseline), V values.
Graphs are causal-learn adjacency matrices G [V, V]: G[i, j] = -1 and G[j, i] = 1 is i -> j;
both -1 is an undirected edge i - j; both 1 is i <-> j; 0 is no edge.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from valuedist.data import schwartz

# ----------------------------------------------------------------------------- discovery

def check_scores(scores: np.ndarray, values: Sequence[str]) -> None:
  r, v = scores.shape
  if v != len(values):
    raise ValueError(f"score matrix has {v} columns for {len(values)} values; give one column per value")
  if r <= v:
    raise ValueError(f"{r} roles for {v} values: the PC algorithm needs more roles than values; add roles")
  flat = np.flatnonzero(scores.std(0) < 1e-9)
  if flat.size:
    raise ValueError(f"value {values[flat[0]]!r} has the same score under every role; no correlation can be "
                     "estimated, check the questionnaire or add roles")


def pc_graph(scores: np.ndarray, alpha: float) -> np.ndarray:
  """PC with Fisher-z conditional independence tests (causal-learn) on [R, V] -> G [V, V].

  Centred value scores sum to a constant across values (each role's item mean is removed),
  so the V columns have rank V - 1 and a test conditioning on all V - 2 other values is
  degenerate (its partial correlation is +-1 by construction). Conditioning sets are
  therefore capped at rank - 2 members when the columns are linearly dependent."""
  from causallearn.search.ConstraintBased.PC import pc
  if not 0 < alpha < 1:
    raise ValueError(f"alpha={alpha} is outside (0, 1); use a significance level such as 0.05")
  x = np.asarray(scores, np.float64)
  rank = int(np.linalg.matrix_rank(x - x.mean(0), tol=1e-9 * max(1.0, float(np.abs(x).max()))))
  max_k = rank - 2 if rank < x.shape[1] else None
  g = pc(x, alpha, "fisherz", stable=True, show_progress=False, verbose=False, max_k=max_k)
  return np.asarray(g.G.graph, np.int8)


def skeleton(g: np.ndarray) -> np.ndarray:
  """[V, V] bool, symmetric: is there any edge between i and j."""
  s = (np.asarray(g) != 0)
  return s | s.T


def bootstrap_stability(scores: np.ndarray, alpha: float, n: int, seed: int = 0) -> dict:
  """Share of n row resamples in which each edge appears: {'skeleton': [V, V], 'directed': [V, V]
  (share with i -> j)}."""
  rng = np.random.default_rng(seed)
  r, v = scores.shape
  sk, di = np.zeros((v, v)), np.zeros((v, v))
  for _ in range(n):
    sample = scores[rng.integers(0, r, r)]
    if (sample.std(0) < 1e-9).any():
      continue
    g = pc_graph(sample, alpha)
    sk += skeleton(g)
    di += (g == -1) & (g.T == 1)
  return {"skeleton": sk / max(n, 1), "directed": di / max(n, 1)}


def possible_descendants(g: np.ndarray, target: int) -> list[int]:
  """Nodes reachable from target along directed (i -> j) or undirected edges: the values
  the graph predicts to move when the target is moved."""
  g = np.asarray(g)
  step = ((g == -1) & (g.T == 1)) | ((g == -1) & (g.T == -1))
  seen, frontier = {target}, [target]
  while frontier:
    i = frontier.pop()
    for j in np.flatnonzero(step[i]):
      if j not in seen:
        seen.add(int(j))
        frontier.append(int(j))
  return sorted(seen - {target})


# ----------------------------------------------------------------------------- human reference

# Schwartz's circle has 9 positions: conformity and tradition share one wedge (tradition on the outside).
CIRCLE = ("self_direction", "stimulation", "hedonism", "achievement", "power", "security",
          ("conformity", "tradition"), "benevolence", "universalism")
# The two bipolar higher-order dimensions; hedonism "shares elements of" openness and self-enhancement
# (Schwartz 2012) and so sits on no single pole here.
OPPOSED_POLES = ((("self_direction", "stimulation"), ("security", "conformity", "tradition")),
                 (("achievement", "power"), ("benevolence", "universalism")))


def circle_position(value: str) -> int:
  """The value's wedge on the 9-position circle (0 = self_direction ... 8 = universalism)."""
  for i, w in enumerate(CIRCLE):
    if value == w or (isinstance(w, tuple) and value in w):
      return i
  raise ValueError(f"unknown value {value!r}; use one of {', '.join(schwartz.VALUES)}")


def circumplex_reference(values: Sequence[str] = schwartz.VALUES) -> tuple[np.ndarray, np.ndarray]:
  """Schwartz's structure over `values` -> (expected sign [V, V] in {+1, -1, 0}, reference skeleton [V, V]).

  Sources: Schwartz 1992 ("Universals in the content and structure of values", Adv. Exp. Soc. Psychol.
  25) and Schwartz 2012 ("An overview of the Schwartz theory of basic values", ORPC 2(1), Fig. 1).
  Circle (9 wedges, `CIRCLE`): 0 self_direction, 1 stimulation, 2 hedonism, 3 achievement, 4 power,
  5 security, 6 {conformity, tradition} (one wedge, tradition outside), 7 benevolence, 8 universalism.
  d = circular distance between wedges (0..4). Rule:
    +1  d <= 1: same wedge (conformity-tradition) or adjacent wedges (12 pairs);
    -1  the values sit on opposite poles of a bipolar higher-order dimension (10 pairs):
        openness {self_direction, stimulation} vs conservation {security, conformity, tradition};
        self-enhancement {achievement, power} vs self-transcendence {benevolence, universalism};
        hedonism belongs to no single pole (it shares openness and self-enhancement), so no -1;
     0  otherwise (23 pairs). The -1 pairs have d in {3, 4}; d alone does not give them: a plain
        "d = 4 is opposed" rule would mark self_direction-power and omit self_direction-tradition (d = 3).
  Examples: conformity-tradition +1 (d 0), benevolence-universalism +1, achievement-power +1,
  universalism-self_direction +1 (d 1), self_direction-tradition -1, power-universalism -1,
  stimulation-security -1, self_direction-power 0 (d 4, not opposite poles), hedonism-tradition 0.
  Skeleton: an edge for every +1 pair (d <= 1)."""
  pos = np.asarray([circle_position(x) for x in values])
  d = np.abs(np.subtract.outer(pos, pos))
  d = np.minimum(d, len(CIRCLE) - d)
  opposed = np.zeros(d.shape, bool)
  for a, b in OPPOSED_POLES:
    ina, inb = np.isin(values, a), np.isin(values, b)
    opposed |= np.outer(ina, inb) | np.outer(inb, ina)
  sign = np.where(d <= 1, 1, np.where(opposed, -1, 0)).astype(np.int8)
  np.fill_diagonal(sign, 0)
  return sign, sign == 1


def reference_from_file(path, values: Sequence[str] = schwartz.VALUES, edge_threshold: float = 0.3):
  """A user-supplied human correlation matrix: CSV with a header row of value keys and one
  row per value in the same order. Returns (sign [V, V], skeleton |r| >= edge_threshold)."""
  path = Path(path)
  if not path.is_file():
    raise ValueError(f"reference file {str(path)!r} does not exist; pass a CSV correlation matrix or '' for the "
                     "circumplex")
  lines = [l for l in path.read_text().splitlines() if l.strip()]
  header = [h.strip() for h in lines[0].split(",")]
  if sorted(header) != sorted(values):
    raise ValueError(f"{path}:1: the header must name the values {', '.join(values)} (got {', '.join(header)})")
  try:
    m = np.asarray([[float(x) for x in l.split(",")] for l in lines[1:]])
  except ValueError:
    raise ValueError(f"{path}: a cell is not a number; write a numeric correlation matrix") from None
  if m.shape != (len(header), len(header)) or not np.allclose(m, m.T, atol=1e-6):
    raise ValueError(f"{path}: need a symmetric {len(header)}x{len(header)} matrix, got shape {m.shape}")
  order = [header.index(v) for v in values]
  m = m[np.ix_(order, order)]
  sign = np.sign(m).astype(np.int8)
  np.fill_diagonal(sign, 0)
  sk = np.abs(m) >= edge_threshold
  np.fill_diagonal(sk, False)
  return sign, sk


def agreement(corr: np.ndarray, g: np.ndarray, ref_sign: np.ndarray, ref_skeleton: np.ndarray) -> dict:
  """Sign agreement over pairs with an expected sign, and edge precision / recall / structural
  Hamming distance of the model's skeleton against the reference skeleton."""
  iu = np.triu_indices(len(corr), 1)
  expected = ref_sign[iu]
  have = expected != 0
  agree = float(np.mean(np.sign(corr[iu][have]) == expected[have])) if have.any() else float("nan")
  mine, ref = skeleton(g)[iu], np.asarray(ref_skeleton)[iu]
  tp = int((mine & ref).sum())
  return {"sign_agreement": agree, "pairs_with_expected_sign": int(have.sum()),
          "edges": int(mine.sum()), "reference_edges": int(ref.sum()),
          "precision": tp / max(int(mine.sum()), 1), "recall": tp / max(int(ref.sum()), 1),
          "shd": int((mine != ref).sum())}


# ----------------------------------------------------------------------------- agreement against chance

ENTRY_KEYS = ("metric", "observed", "chance", "null_percentile", "ci", "null_interval")
GRAPH_METRICS = ("precision", "recall", "shd")


def _centre_rows(x: np.ndarray) -> np.ndarray:
  """[..., R, V] -> each row minus its mean over values (as value_scores(centre=True))."""
  return x - x.mean(-1, keepdims=True)


def batch_sign_agreement(x: np.ndarray, ref_sign: np.ndarray) -> np.ndarray:
  """Scores [n, R, V] -> [n] sign agreement of each sample's value correlations with ref_sign
  over pairs with an expected sign (as `agreement`); nan where a column is constant."""
  z = x - x.mean(-2, keepdims=True)
  sd = np.sqrt((z * z).mean(-2, keepdims=True))
  ok = (sd > 1e-12).all((-2, -1))
  z = z / np.where(sd > 1e-12, sd, 1.0)
  iu = np.triu_indices(x.shape[-1], 1)
  expected = np.asarray(ref_sign)[iu]
  have = expected != 0
  corr = np.einsum("nri,nrj->nij", z, z)[:, iu[0][have], iu[1][have]]
  agree = (np.sign(corr) == expected[have]).mean(-1) if have.any() else np.full(len(x), np.nan)
  return np.where(ok, agree, np.nan)


def sign_null(scores: np.ndarray, ref_sign: np.ndarray, n: int, rng: np.random.Generator, centre: bool = True,
              chunk: int = 250) -> np.ndarray:
  """Permutation null [n] of the sign agreement: each value column of scores [R, V] is permuted
  independently across roles, then (when centre) each role's row is centred again."""
  r, v = scores.shape
  out = []
  for m in [chunk] * (n // chunk) + ([n % chunk] if n % chunk else []):
    idx = np.argsort(rng.random((m, r, v)), axis=1)
    x = np.take_along_axis(np.broadcast_to(scores, (m, r, v)), idx, axis=1)
    out.append(batch_sign_agreement(_centre_rows(x) if centre else x, ref_sign))
  return np.concatenate(out) if out else np.zeros(0)


def sign_bootstrap(scores: np.ndarray, ref_sign: np.ndarray, n: int, rng: np.random.Generator,
                   chunk: int = 250) -> np.ndarray:
  """[n] sign agreement on role resamples (rows drawn with replacement) of scores [R, V]."""
  r = len(scores)
  out = [batch_sign_agreement(scores[rng.integers(0, r, (m, r))], ref_sign)
         for m in [chunk] * (n // chunk) + ([n % chunk] if n % chunk else [])]
  return np.concatenate(out) if out else np.zeros(0)


def graph_figures(sk: np.ndarray, ref: np.ndarray) -> dict:
  """Skeleton pairs [n, P] bool and reference pairs [P] bool -> {precision, recall, shd: [n]}
  (as `agreement`: precision tp / max(edges, 1), recall tp / max(reference edges, 1), shd = pairs that differ)."""
  sk, ref = np.atleast_2d(sk), np.asarray(ref, bool)
  tp = (sk & ref).sum(-1)
  return {"precision": tp / np.maximum(sk.sum(-1), 1), "recall": tp / max(int(ref.sum()), 1),
          "shd": (sk != ref).sum(-1).astype(np.float64)}


def random_skeletons(n_pairs: int, k: int, n: int, rng: np.random.Generator) -> np.ndarray:
  """[n, n_pairs] bool: n uniformly random edge sets with exactly k of the n_pairs pairs."""
  rank = np.argsort(rng.random((n, n_pairs)), axis=1)
  out = np.zeros((n, n_pairs), bool)
  np.put_along_axis(out, rank[:, :k], True, axis=1)
  return out


def graph_bootstrap(scores: np.ndarray, ref: np.ndarray, alpha: float, n: int, rng: np.random.Generator) -> dict:
  """{metric: [n]}: graph figures of PC re-run (at alpha) on n role resamples of scores [R, V];
  nan for a resample with a constant column."""
  r, v = scores.shape
  iu = np.triu_indices(v, 1)
  out = {m: np.full(n, np.nan) for m in GRAPH_METRICS}
  for b in range(n):
    sample = scores[rng.integers(0, r, r)]
    if (sample.std(0) < 1e-9).any():
      continue
    fig = graph_figures(skeleton(pc_graph(sample, alpha))[iu], ref)
    for m in GRAPH_METRICS:
      out[m][b] = fig[m][0]
  return out


def chance_entry(metric: str, observed: float, null: np.ndarray, boot: np.ndarray | None) -> dict:
  """One agreement figure in the rule-13 schema (`ENTRY_KEYS`): null [n] draws, boot [m] bootstrap
  figures or None; percentile = % of null draws <= observed. Undefined parts (no draws, nan) are None."""
  null = null[np.isfinite(null)]
  boot = None if boot is None else boot[np.isfinite(boot)]
  q = lambda a: [round(float(x), 6) for x in np.percentile(a, [2.5, 97.5])] if a is not None and a.size else None
  seen = bool(np.isfinite(observed))
  return {"metric": metric, "observed": float(observed) if seen else None,
          "chance": float(null.mean()) if null.size else None,
          "null_percentile": float(100 * np.mean(null <= observed + 1e-12)) if null.size and seen else None,
          "ci": q(boot), "null_interval": q(null)}


def agreement_with_chance(scores: np.ndarray, g: np.ndarray, ref_sign: np.ndarray, ref_skeleton: np.ndarray, *,
                          n_null: int = 1000, n_boot: int = 1000, seed: int = 0, alpha: float | None = None,
                          centre: bool = True) -> dict:
  """Every figure of `agreement` with its chance level (STUDY_PROTOCOL rules 6, 13).

  scores [R, V] (roles x values, as given to PC), g [V, V] the graph, ref_sign / ref_skeleton [V, V].
  Returns {"comparisons": [entry per metric], "centring_floor": {...} or None, "null": {...}};
  an entry has exactly `ENTRY_KEYS`:
    observed         the figure on the data (sign agreement on row-centred scores when centre; a
                     no-op for value_scores(centre=True) with equal item counts per value);
    chance           mean of the null; null_percentile: % of null draws <= observed (ties count as
                     <=); null_interval: the null's 2.5 / 97.5 % quantiles;
    sign_agreement   null: each value column permuted independently across roles, then each row
                     re-centred (when centre), correlations recomputed; ci: percentile bootstrap
                     over roles (n_boot resamples);
    precision, recall, shd  null: uniformly random skeletons with as many edges as g. Higher precision /
                     recall is better (percentile near 100 = beyond chance); LOWER shd is better (a
                     percentile near 0 = beyond chance). ci: None unless alpha is given, then a
                     percentile bootstrap of PC re-run at alpha on n_boot role resamples (g is then
                     taken to be pc_graph(scores, alpha); costs n_boot PC runs).
  centring_floor: the mean correlation -1/(V-1) that row centring induces between exchangeable
  values, and the sign agreement of a correlation matrix negative everywhere (None when not centre)."""
  x = np.asarray(scores, np.float64)
  r, v = x.shape
  if np.shape(g) != (v, v) or np.shape(ref_sign) != (v, v) or np.shape(ref_skeleton) != (v, v):
    raise ValueError(f"scores have {v} value columns; g, ref_sign and ref_skeleton must all be {v}x{v}")
  x = _centre_rows(x) if centre else x
  rng_sign, rng_boot, rng_graph, rng_pc = [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4)]
  out = [chance_entry("sign_agreement", batch_sign_agreement(x[None], ref_sign)[0],
                      sign_null(x, ref_sign, n_null, rng_sign, centre), sign_bootstrap(x, ref_sign, n_boot, rng_boot))]
  iu = np.triu_indices(v, 1)
  mine, ref = skeleton(g)[iu], np.asarray(ref_skeleton, bool)[iu]
  obs = graph_figures(mine, ref)
  null = graph_figures(random_skeletons(len(ref), int(mine.sum()), n_null, rng_graph), ref)
  boot = graph_bootstrap(x, ref, alpha, n_boot, rng_pc) if alpha is not None else {}
  out += [chance_entry(m, obs[m][0], null[m], boot.get(m)) for m in GRAPH_METRICS]
  expected = np.asarray(ref_sign)[iu]
  floor = None
  if centre and (expected != 0).any():
    floor = {"expected_correlation": -1 / (v - 1),
             "sign_agreement_all_negative": float(np.mean(expected[expected != 0] == -1))}
  return {"comparisons": out, "centring_floor": floor,
          "null": {"n_null": n_null, "n_boot": n_boot, "seed": seed, "centre": centre, "alpha": alpha, "roles": r,
                   "sign": "value columns permuted independently across roles, rows re-centred" if centre
                   else "value columns permuted independently across roles",
                   "graph": f"uniformly random skeletons with {int(mine.sum())} of {len(ref)} possible edges"}}


# ----------------------------------------------------------------------------- side effects

def side_effects(delta: np.ndarray, target: int, g: np.ndarray, threshold: float) -> dict:
  """delta [V]: change of every value score under an intervention on `target`. Observed side
  effects: non-targets with |delta| >= threshold; predicted: the graph's possible descendants."""
  v = len(delta)
  non = [i for i in range(v) if i != target]
  observed = {i for i in non if abs(delta[i]) >= threshold}
  predicted = set(possible_descendants(g, target))
  tp = len(observed & predicted)
  return {"target_change": float(delta[target]), "mean_abs_non_target": float(np.mean(np.abs(delta[non]))),
          "predicted": sorted(predicted), "observed": sorted(observed),
          "precision": tp / len(predicted) if predicted else None,
          "recall": tp / len(observed) if observed else None}


def rank_roles(delta: np.ndarray, target: int) -> np.ndarray:
  """delta [R, V] (role minus no-role scores) -> role indices, best first, by the target's
  change minus the mean absolute change of the other values. In-sample: it favours roles with
  small side effects, so side effects scored on its choice are biased; `side_effects.graph_steering`
  is the held-out test."""
  non = [i for i in range(delta.shape[1]) if i != target]
  return np.argsort(-(delta[:, target] - np.abs(delta[:, non]).mean(1)), kind="stable")
