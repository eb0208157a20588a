"""Likelihood readouts of a (possibly steered) model, jitted: teacher-forced log-probabilities,
NLL and perplexity of responses, and next-token logits of answer options."""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from valuedist.model import transformer
from valuedist.model.config import ModelConfig


# ----------------------------------------------------------------------------- likelihood

def _scored(prompt_mask, response_mask) -> jax.Array:
  """[B, R] bool: response tokens that are real and follow a real token."""
  before = jnp.concatenate([prompt_mask[:, -1:], response_mask[:, :-1]], 1)
  return (jnp.asarray(response_mask) > 0) & (before > 0)


@functools.partial(jax.jit, static_argnames=("cfg",))
def response_logprobs(params: dict, cfg: ModelConfig, prompt_tokens: jax.Array, prompt_mask: jax.Array,
                      response_tokens: jax.Array, response_mask: jax.Array,
                      intervene: Optional[transformer.Intervention] = None) -> jax.Array:
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
    _, _, taps = transformer.forward(params, prompt_tokens, cfg, attention_mask=prompt_mask, taps=intervene.prefill_taps,
                                     tap_last=True, intervene=intervene, logits=False)
    intervene = intervene.after_prefill(taps)
  tokens = jnp.concatenate([prompt_tokens, response_tokens], 1).astype(jnp.int32)
  mask = jnp.concatenate([prompt_mask, response_mask], 1).astype(jnp.int32)
  _, _, taps = transformer.forward(params, tokens, cfg, attention_mask=mask, taps=("final_normed",),
                                   logits=False, intervene=intervene)
  h = taps["final_normed"][:, p - 1:-1]                                      # [B, R, D]
  pos = transformer.positions_from_mask(mask)[:, p - 1:-1]
  z = transformer.project(params, h, cfg, intervene, pos, mask[:, p - 1:-1], jnp.sum(prompt_mask, -1))
  logp = jax.nn.log_softmax(z, -1)
  lp = jnp.take_along_axis(logp, response_tokens[..., None].astype(jnp.int32), -1)[..., 0]
  return jnp.where(_scored(prompt_mask, response_mask), lp, 0.0)


def response_nll(params: dict, cfg: ModelConfig, prompt_tokens, prompt_mask, response_tokens, response_mask,
                 intervene: Optional[transformer.Intervention] = None) -> tuple[jax.Array, jax.Array]:
  """(summed NLL f32 [B], scored token count int32 [B]) of each response given its prompt;
  arguments as in `response_logprobs`."""
  lp = response_logprobs(params, cfg, prompt_tokens, prompt_mask, response_tokens, response_mask, intervene)
  return -lp.sum(-1), _scored(jnp.asarray(prompt_mask), response_mask).sum(-1).astype(jnp.int32)


def perplexity(params: dict, cfg: ModelConfig, prompt_tokens, prompt_mask, response_tokens, response_mask,
               intervene: Optional[transformer.Intervention] = None) -> jax.Array:
  """exp(NLL / tokens) per row, f32 [B]; NaN for a row with no scored token."""
  nll, n = response_nll(params, cfg, prompt_tokens, prompt_mask, response_tokens, response_mask, intervene)
  return jnp.where(n > 0, jnp.exp(nll / jnp.maximum(n, 1)), jnp.nan)


def answer_perplexity(params: dict, cfg: ModelConfig, prompt_tokens, prompt_mask, answers: jax.Array,
                      lengths: jax.Array) -> jax.Array:
  """`perplexity` of generated answers [B, N] (first lengths [B] tokens real, the rest padding
  of any value) given prompt_tokens, prompt_mask [B, T], under the unedited model: f32 [B]."""
  response_mask = (jnp.arange(answers.shape[1])[None] < lengths[:, None]).astype(jnp.int32)
  return perplexity(params, cfg, prompt_tokens, prompt_mask, jnp.where(response_mask > 0, answers, 0), response_mask)


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


@functools.partial(jax.jit, static_argnames=("cfg", "log_probs"))
def option_logits(params: dict, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array, option_ids: jax.Array,
                  intervene: Optional[transformer.Intervention] = None, log_probs: bool = False) -> jax.Array:
  """Next-token logits of K options after a left-padded prompt batch: tokens, mask [B, T],
  option_ids [K, S] (-1 = unused) -> f32 [B, K]. An option's logit is the logsumexp over its
  surface forms ('3', ' 3'), so a softmax over options gives each option's share of the
  probability of answering with any option. Only the last position is projected onto the
  vocabulary; `intervene` applies at every site. With `log_probs`, each option's value is its
  log-probability under the full vocabulary (a shift per row: a softmax over options is
  unchanged, and their logsumexp is the total probability on the options)."""
  _, _, taps = transformer.forward(params, tokens, cfg, attention_mask=mask, taps=("final_normed",), logits=False,
                                   intervene=intervene)
  pos = transformer.positions_from_mask(mask)[:, -1:]
  z = transformer.project(params, taps["final_normed"][:, -1:], cfg, intervene, pos, mask[:, -1:])[:, 0]   # [B, V]
  if log_probs:
    z = jax.nn.log_softmax(z, axis=-1)
  picked = jnp.take(z, jnp.maximum(option_ids, 0), axis=-1)                      # [B, K, S]
  return jax.nn.logsumexp(jnp.where(option_ids >= 0, picked, -jnp.inf), axis=-1)
