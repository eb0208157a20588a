"""Text metrics of generated token sequences (host numpy): distinct-n, repetition, degeneracy."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def _ngrams(tokens, n: int) -> np.ndarray:
  """[M, n] n-grams of one token sequence (M = 0 when it is shorter than n)."""
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  t = np.asarray(tokens, np.int64).reshape(-1)
  if t.size < n:
    return np.zeros((0, n), np.int64)
  return np.lib.stride_tricks.sliding_window_view(t, n)


def _unique_share(grams: np.ndarray) -> float:
  return len(np.unique(grams, axis=0)) / len(grams) if len(grams) else 0.0


def distinct_n(token_lists: Sequence[Sequence[int]], n: int) -> float:
  """Distinct-n over a set of responses: unique n-grams / all n-grams, n-grams taken within
  each response. 0.0 when no response has n tokens."""
  grams = [_ngrams(t, n) for t in token_lists]
  return _unique_share(np.concatenate(grams) if grams else np.zeros((0, n), np.int64))


def repetition_rate(tokens: Sequence[int], n: int = 4) -> float:
  """seq-rep-n of one response: 1 - unique n-grams / n-grams (0.0 when shorter than n)."""
  grams = _ngrams(tokens, n)
  return 1.0 - _unique_share(grams) if len(grams) else 0.0


def is_degenerate(tokens: Sequence[int], *, min_len: int = 1, max_repeat_frac: float = 0.5, n: int = 4) -> bool:
  """True for a response shorter than min_len tokens, or stuck in a loop: more than
  max_repeat_frac of its n-grams repeat an earlier one."""
  return len(tokens) < min_len or repetition_rate(tokens, n) > max_repeat_frac
