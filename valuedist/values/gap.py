"""The value-distinction gap: positive vs negative anchor-word logits, per step and lexicon.

For logits z [V] and one lexicon with positive ids P and negative ids N:
  mean:       mean_P z - mean_N z
  max:        max_P z - max_N z
  lse:        logsumexp_P z - logsumexp_N z
  normalised: mean / std_V(z)   (invariant to the logit scale, so comparable across models)

Two paths compute the same numbers. `gap_from_logits` reads full logits. `gap_from_normed`
needs only the final normed hidden state h [D]: anchor logits are h @ W[:, ids], and the
vocabulary moments follow from the unembedding's column mean and its centred Gram matrix,
mean_V(z) = h.m and var_V(z) = h^T C h with C = (W - m)(W - m)^T / V, so the [D, V]
projection is skipped (it dominates large-vocabulary models such as Gemma).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from valuedist.model import transformer
from valuedist.model.config import ModelConfig
from valuedist.values.anchors import Anchors

VARIANTS = ("mean", "max", "lse", "normalised")


def side_stats(za: jax.Array, mask: jax.Array) -> dict[str, jax.Array]:
  """za: anchor logits [..., G, 2, K]; mask [G, 2, K] -> mean/max/lse gaps [..., G]."""
  m = mask.astype(za.dtype)
  mean = (za * m).sum(-1) / m.sum(-1)
  masked = jnp.where(mask, za, -jnp.inf)
  mx = masked.max(-1)
  lse = jax.nn.logsumexp(masked, -1)
  d = lambda x: x[..., 0] - x[..., 1]
  return {"mean": d(mean), "max": d(mx), "lse": d(lse)}


def anchor_logits(z: jax.Array, anchors: Anchors) -> jax.Array:
  """z [..., V] -> [..., G, 2, K]."""
  return z[..., anchors.ids]


def gap_from_logits(z: jax.Array, anchors: Anchors) -> dict[str, jax.Array]:
  """Full logits z [..., V] (f32) -> {variant: [..., G]}."""
  z = z.astype(jnp.float32)
  out = side_stats(anchor_logits(z, anchors), anchors.mask)
  out["normalised"] = out["mean"] / vocab_std(z, anchors.vocab)[..., None]
  return out


def vocab_std(z: jax.Array, vocab: int = 0) -> jax.Array:
  """std over the vocabulary of logits z [..., V] -> [...]. With `vocab` < V (logits padded
  for a model axis) only the first `vocab` columns count, by masked sums, so logits split on
  the model axis are reduced in place, never gathered."""
  if not vocab or vocab >= z.shape[-1]:
    return jnp.std(z, -1)
  valid = jnp.arange(z.shape[-1]) < vocab
  mean = jnp.sum(jnp.where(valid, z, 0.0), -1, keepdims=True) / vocab
  return jnp.sqrt(jnp.sum(jnp.where(valid, jnp.square(z - mean), 0.0), -1) / vocab)


class UnembedStats(struct.PyTreeNode):
  """Precomputed unembedding quantities for `gap_from_normed`.
  w_anchor: [D, G, 2, K] anchor columns; col_mean: [D]; gram: [D, D] centred Gram / V."""
  w_anchor: jax.Array
  col_mean: jax.Array
  gram: jax.Array


@functools.partial(jax.jit, static_argnames="cfg")
def unembed_stats(params: dict, anchors: Anchors, cfg: ModelConfig) -> UnembedStats:
  if cfg.final_softcap is not None:
    raise ValueError("gap_from_normed needs linear logits; this model soft-caps them: use gap_from_logits")
  w = transformer.unembed_kernel(params, cfg).astype(jnp.float32)[:, :cfg.vocab_size]   # [D, V], no padding
  col_mean = w.mean(1)
  wc = w - col_mean[:, None]
  gram = (wc @ wc.T) / w.shape[1]
  return UnembedStats(w[:, anchors.ids], col_mean, gram)


def gap_from_normed(h: jax.Array, stats: UnembedStats, anchors: Anchors) -> dict[str, jax.Array]:
  """Final normed hidden h [..., D] -> {variant: [..., G]}, without the vocabulary projection."""
  h = h.astype(jnp.float32)
  za = jnp.einsum("...d,dgsk->...gsk", h, stats.w_anchor)
  out = side_stats(za, anchors.mask)
  var = jnp.einsum("...d,de,...e->...", h, stats.gram, h)
  out["normalised"] = out["mean"] / jnp.sqrt(jnp.maximum(var, 1e-30))[..., None]
  return out


@functools.partial(jax.jit, static_argnames=("cfg",))
def teacher_forced_gaps(params: dict, tokens: jax.Array, mask: jax.Array, anchors: Anchors,
                        stats: UnembedStats | None, cfg: ModelConfig) -> dict[str, jax.Array]:
  """Gap at every position of a left-padded batch. tokens, mask: [B, T] -> {variant: [B, T, G]}.
  Position t holds the gap of the distribution that predicts token t + 1. With `stats`
  the vocabulary projection is skipped."""
  if stats is None:
    z, _, _ = transformer.forward(params, tokens, cfg, attention_mask=mask)
    return gap_from_logits(z, anchors)
  _, _, taps = transformer.forward(params, tokens, cfg, attention_mask=mask, taps=("final_normed",), logits=False)
  return gap_from_normed(taps["final_normed"], stats, anchors)


def top_anchor_ids(z: jax.Array, anchors: Anchors) -> jax.Array:
  """z [..., V] -> [..., G, 2]: the anchor token with the highest logit on each side (the
  token behind the 'max' variant)."""
  za = jnp.where(anchors.mask, anchor_logits(z, anchors), -jnp.inf)
  return jnp.take_along_axis(jnp.broadcast_to(anchors.ids, za.shape), za.argmax(-1)[..., None], -1)[..., 0]


def observe_gap(logits: jax.Array, taps: dict, aux: Anchors) -> dict[str, jax.Array]:
  """`sampler.generate` observer (pass the anchors as observe_aux): the gap of each decode
  step's distribution, {variant: [B, G]}, and 'top_ids' [B, G, 2] (`top_anchor_ids`)."""
  return {**gap_from_logits(logits, aux), "top_ids": top_anchor_ids(logits, aux)}


def token_shift(aligned_logits: jax.Array, base_logits: jax.Array) -> dict[str, jax.Array]:
  """URIAL token-distribution shift at each position (same tokenizer required).

  Inputs [..., V]. Returns rank_of_top: the base model's rank (1 = top) of the aligned
  model's top token, and kl: KL(aligned || base) per position."""
  top = jnp.argmax(aligned_logits, -1)
  top_base_logit = jnp.take_along_axis(base_logits, top[..., None], -1)
  rank = 1 + (base_logits > top_base_logit).sum(-1)
  pa = jax.nn.log_softmax(aligned_logits.astype(jnp.float32), -1)
  pb = jax.nn.log_softmax(base_logits.astype(jnp.float32), -1)
  kl = (jnp.exp(pa) * (pa - pb)).sum(-1)
  return {"rank_of_top": rank, "kl": kl}


@functools.partial(jax.jit, static_argnames=("cfg_aligned", "cfg_base"))
def token_shift_batch(params_aligned: dict, params_base: dict, tokens: jax.Array, mask: jax.Array,
                      cfg_aligned: ModelConfig, cfg_base: ModelConfig) -> dict[str, jax.Array]:
  """Both models on the same left-padded tokens [B, T] -> token_shift figures [B, T]."""
  za, _, _ = transformer.forward(params_aligned, tokens, cfg_aligned, attention_mask=mask)
  zb, _, _ = transformer.forward(params_base, tokens, cfg_base, attention_mask=mask)
  return token_shift(za, zb)
