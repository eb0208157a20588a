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

def circumplex_reference(values: Sequence[str] = schwartz.VALUES) -> tuple[np.ndarray, np.ndarray]:
  """Schwartz's circular structure over `values` in circumplex order: (expected sign [V, V]
  in {+1, -1, 0}: +1 for neighbours, -1 for values 4-5 steps apart, 0 otherwise; reference
  skeleton [V, V]: neighbours on the circle)."""
  pos = [schwartz.VALUES.index(x) for x in values]
  d = np.abs(np.subtract.outer(pos, pos))
  d = np.minimum(d, len(schwartz.VALUES) - d)
  sign = np.where(d == 1, 1, np.where(d >= 4, -1, 0)).astype(np.int8)
  np.fill_diagonal(sign, 0)
  return sign, d == 1


def reference_from_file(path, values: Sequence[str] = schwartz.VALUES, edge_threshold: float = 0.3):
  """A user-supplied human correlation matrix: CSV with a header row of value keys and one
  row per value in the same order. Returns (sign [V, V], skeleton |r| >= edge_threshold)."""
  path = Path(path)
  if not path.is_file():
    raise ValueError(f"reference file {str(path)!r} does not exist; pass a CSV correlation matrix or '' for the circumplex")
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
  change minus the mean absolute change of the other values."""
  non = [i for i in range(delta.shape[1]) if i != target]
  return np.argsort(-(delta[:, target] - np.abs(delta[:, non]).mean(1)), kind="stable")
