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
