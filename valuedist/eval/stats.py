"""Statistics on host values (numpy): percentile-bootstrap intervals of means and of
differences (paired or not), and effect sizes. Every resampling takes an explicit seed."""
from __future__ import annotations

import numpy as np


def _sample(values, what: str = "values") -> np.ndarray:
  v = np.asarray(values, np.float64)
  if v.ndim != 1 or v.size == 0:
    raise ValueError(f"{what} must be a non-empty 1-D array, got shape {v.shape}")
  if not np.isfinite(v).all():
    raise ValueError(f"{what} holds {int((~np.isfinite(v)).sum())} non-finite values (NaN or inf)")
  return v


def _resample_idx(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  """[n, size] row indices of n bootstrap resamples (one array: no loop over resamples)."""
  return rng.integers(0, size, (n, size))


def _interval(point: float, stats: np.ndarray, alpha: float) -> tuple[float, float, float]:
  if not 0.0 < alpha < 1.0:
    raise ValueError(f"alpha must be in (0, 1), got {alpha}")
  lo, hi = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
  return float(point), float(lo), float(hi)


def bootstrap_ci(values, *, n: int = 2000, alpha: float = 0.05, seed: int = 0) -> tuple[float, float, float]:
  """(mean, lo, hi): the sample mean and its percentile-bootstrap (1 - alpha) interval from n
  resamples. Values [N]; deterministic for a seed."""
  v = _sample(values)
  return _interval(v.mean(), v[_resample_idx(np.random.default_rng(seed), n, len(v))].mean(1), alpha)


def bootstrap_diff_ci(a, b, *, n: int = 2000, alpha: float = 0.05, seed: int = 0,
                      paired: bool = False) -> tuple[float, float, float]:
  """(mean(a) - mean(b), lo, hi) with a percentile-bootstrap interval. a and b are resampled
  independently; paired=True (equal lengths, row i of a matches row i of b) resamples rows
  together."""
  a, b = _sample(a, "a"), _sample(b, "b")
  rng = np.random.default_rng(seed)
  if paired:
    if len(a) != len(b):
      raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    idx = _resample_idx(rng, n, len(a))
    diffs = a[idx].mean(1) - b[idx].mean(1)
  else:
    diffs = a[_resample_idx(rng, n, len(a))].mean(1) - b[_resample_idx(rng, n, len(b))].mean(1)
  return _interval(a.mean() - b.mean(), diffs, alpha)


def cohens_d(a, b) -> float:
  """(mean(a) - mean(b)) / pooled standard deviation (ddof 1); +-inf or NaN when both
  samples are constant."""
  a, b = _sample(a, "a"), _sample(b, "b")
  if len(a) + len(b) < 3:
    raise ValueError(f"Cohen's d needs at least 3 values in all, got {len(a)} + {len(b)}")
  pooled = ((len(a) - 1) * a.var(ddof=1 if len(a) > 1 else 0)
            + (len(b) - 1) * b.var(ddof=1 if len(b) > 1 else 0)) / (len(a) + len(b) - 2)
  with np.errstate(divide="ignore", invalid="ignore"):
    return float((a.mean() - b.mean()) / np.sqrt(pooled))


# ----------------------------------------------------------------------------- paired comparisons

def _strata_index(strata, size: int) -> list[np.ndarray]:
  """Row indices of each stratum (sorted by label); one stratum of all rows when strata is None."""
  if strata is None:
    return [np.arange(size)]
  s = np.asarray(strata)
  if s.shape != (size,):
    raise ValueError(f"strata must give one label per item ({size}), got shape {s.shape}")
  return [np.flatnonzero(s == label) for label in sorted(set(s.tolist()))]


def paired_bootstrap(treatment, control, *, strata=None, n: int = 2000, alpha: float = 0.05,
                     seed: int) -> dict:
  """Paired comparison of two conditions on the same N items.

  treatment, control: [N] per-item values (row i of both is item i); strata: [N] group labels
  (e.g. values) or None. The estimate is mean(treatment - control); its percentile-bootstrap
  (1 - alpha) interval resamples items with replacement *within each stratum* (stratum sizes
  kept), so every resample has the design's mix of groups. p is two-sided, from a paired
  sign-flip permutation test of the per-item differences (n flips, +1 smoothing): the
  probability under 'no difference' (each item's difference equally likely of either sign)
  of a mean difference at least as far from 0 as the observed one.
  Returns {'estimate', 'ci': [lo, hi], 'p', 'n'}."""
  t, c = _sample(treatment, "treatment"), _sample(control, "control")
  if len(t) != len(c):
    raise ValueError(f"paired samples need equal lengths, got {len(t)} and {len(c)}")
  d = t - c
  rng = np.random.default_rng(seed)
  groups = _strata_index(strata, len(d))
  sums = np.zeros(n)
  for idx in groups:
    sums += d[idx][_resample_idx(rng, n, len(idx))].sum(1)
  estimate, lo, hi = _interval(d.mean(), sums / len(d), alpha)
  signs = rng.choice(np.array([-1.0, 1.0]), size=(n, len(d)))
  null = np.abs((signs * d).mean(1))
  p = (1 + np.count_nonzero(null >= abs(d.mean()) - 1e-12)) / (1 + n)
  return {"estimate": estimate, "ci": [lo, hi], "p": float(p), "n": int(len(d))}


def holm(pvalues) -> np.ndarray:
  """Holm step-down adjusted p-values [M] (family-wise error control across M tests)."""
  p = np.asarray(pvalues, np.float64)
  order = np.argsort(p, kind="stable")
  m = len(p)
  adjusted = np.maximum.accumulate((m - np.arange(m)) * p[order])
  out = np.empty(m)
  out[order] = np.minimum(adjusted, 1.0)
  return out


def comparison(metric: str, treatment: str, control: str, t_values, c_values, *, strata=None, n: int = 2000,
               alpha: float = 0.05, seed: int) -> dict:
  """One row of a summary's `comparisons` (STUDY_PROTOCOL rule 13): a paired, optionally
  stratified comparison of `treatment` against `control` on `metric`; 'p_holm' is filled by
  `with_holm` once the table is complete."""
  r = paired_bootstrap(t_values, c_values, strata=strata, n=n, alpha=alpha, seed=seed)
  return {"metric": metric, "treatment": treatment, "control": control, "estimate": r["estimate"], "ci": r["ci"],
          "p": r["p"], "p_holm": None, "n": r["n"], "paired": True}


def with_holm(comparisons: list[dict]) -> list[dict]:
  """The comparisons with 'p_holm' set, Holm-corrected across the whole list."""
  adjusted = holm([c["p"] for c in comparisons]) if comparisons else []
  return [dict(c, p_holm=float(a)) for c, a in zip(comparisons, adjusted)]
