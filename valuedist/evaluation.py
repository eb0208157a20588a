"""Response scoring and statistics: teacher-forced NLL / perplexity, diversity and
degeneracy of generated tokens, bootstrap intervals and effect sizes.

The likelihoods are jitted JAX; the rest is plain numpy on host values.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from valuedist import model
from valuedist.config import ModelConfig


# ----------------------------------------------------------------------------- likelihood

def _scored(prompt_mask, response_mask) -> jax.Array:
  """[B, R] bool: response tokens that are real and follow a real token."""
  before = jnp.concatenate([prompt_mask[:, -1:], response_mask[:, :-1]], 1)
  return (jnp.asarray(response_mask) > 0) & (before > 0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def response_logprobs(params: dict, cfg: ModelConfig, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      response_tokens: jax.Array, response_mask: jax.Array,
                      intervene: Optional[model.Intervention] = None) -> jax.Array:
  """Teacher-forced log p(response token | everything before it), f32 [B, R]; 0 at pads.

  prompt_tokens, prompt_mask: [B, P] left padded; response_tokens, response_mask: [B, R]
  right padded. One forward over their concatenation; only the R predicting positions are
  projected to the vocabulary. A token counts only where the token before it is real (so a
  row with an empty prompt does not score its first response token). `intervene` steers
  the scoring model as in generation: one that decides its edit in prefill (`prefill_taps`,
  e.g. ConVA) decides it on the prompt alone, and its `after_prefill` edit then applies to
  prompt and response alike."""
  p = prompt_tokens.shape[1]
  if p == 0:
    raise ValueError("prompt_tokens has no columns: the first response token needs a prompt token before it")
  if intervene is not None and intervene.prefill_taps:
    _, _, taps = model.forward(params, prompt_tokens, cfg, attention_mask=prompt_mask, taps=intervene.prefill_taps,
                               tap_last=True, intervene=intervene, logits=False)
    intervene = intervene.after_prefill(taps)
  tokens = jnp.concatenate([prompt_tokens, response_tokens], 1).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask, response_mask], 1).astype(jnp.int32)
  _, _, taps = model.forward(params, tokens, cfg, attention_mask=mask, taps=("final_normed",),
                             logits=False, intervene=intervene)
  h = taps["final_normed"][:, p - 1:-1]                                      # [B, R, D]
  z = (intervene or model.Intervention()).logits(model.logits_from_normed(params, h, cfg))
  logp = jax.nn.log_softmax(z, -1)
  lp = jnp.take_along_axis(logp, response_tokens[..., None].astype(jnp.int32), -1)[..., 0]
  return jnp.where(_scored(prompt_mask, response_mask), lp, 0.0)


def response_nll(params: dict, cfg: ModelConfig, prompt_tokens, prompt_mask, response_tokens, response_mask,
                 intervene: Optional[model.Intervention] = None) -> tuple[jax.Array, jax.Array]:
  """(summed NLL f32 [B], scored token count int32 [B]) of each response given its prompt;
  arguments as in `response_logprobs`."""
  lp = response_logprobs(params, cfg, prompt_tokens, prompt_mask, response_tokens, response_mask, intervene)
  return -lp.sum(-1), _scored(jnp.asarray(prompt_mask), response_mask).sum(-1).astype(jnp.int32)


def perplexity(params: dict, cfg: ModelConfig, prompt_tokens, prompt_mask, response_tokens, response_mask,
               intervene: Optional[model.Intervention] = None) -> jax.Array:
  """exp(NLL / tokens) per row, f32 [B]; NaN for a row with no scored token."""
  nll, n = response_nll(params, cfg, prompt_tokens, prompt_mask, response_tokens, response_mask, intervene)
  return jnp.where(n > 0, jnp.exp(nll / jnp.maximum(n, 1)), jnp.nan)


# ----------------------------------------------------------------------------- diversity

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


# ----------------------------------------------------------------------------- statistics

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


# ----------------------------------------------------------------------------- option scoring

def option_token_ids(tokenizer, options: Sequence[str]) -> np.ndarray:
  """Token ids [K, S] of each option's single-token surface forms ('3', ' 3'), padded with -1.
  A form that is not one token is skipped; an option with no single-token form is an error."""
  rows = []
  for o in options:
    ids = []
    for form in (o, " " + o):
      t = tokenizer.encode(form, add_special_tokens=False)
      if len(t) == 1 and t[0] not in ids:
        ids.append(t[0])
    if not ids:
      raise ValueError(f"option {o!r} is not a single token for this tokenizer; use options that are")
    rows.append(ids)
  width = max(len(r) for r in rows)
  return np.asarray([r + [-1] * (width - len(r)) for r in rows], np.int32)


@functools.partial(jax.jit, static_argnames="cfg")
def option_logits(params: dict, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array, option_ids: jax.Array,
                  intervene: Optional[model.Intervention] = None) -> jax.Array:
  """Next-token logits of K options after a left-padded prompt batch: tokens, mask [B, T],
  option_ids [K, S] (-1 = unused) -> f32 [B, K]. An option's logit is the logsumexp over its
  surface forms ('3', ' 3'), so a softmax over options gives each option's share of the
  probability of answering with any option. Only the last position is projected onto the
  vocabulary; `intervene` applies at every site."""
  _, _, taps = model.forward(params, tokens, cfg, attention_mask=mask, taps=("final_normed",), logits=False,
                             intervene=intervene)
  z = model.logits_from_normed(params, taps["final_normed"][:, -1], cfg)       # [B, V]
  if intervene is not None:
    z = intervene.logits(z)
  picked = jnp.take(z, jnp.maximum(option_ids, 0), axis=-1)                      # [B, K, S]
  return jax.nn.logsumexp(jnp.where(option_ids >= 0, picked, -jnp.inf), axis=-1)
