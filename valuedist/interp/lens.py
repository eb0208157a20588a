"""Logit lens, per-head outputs and direct logit attribution.

The final norm is nonlinear; direct logit attribution freezes its per-token scale at the
final residual stream (the usual linearisation), so contributions of all components plus
the embedding sum to the logit difference before soft-capping (for families without
post-norms; with them, attn.out / mlp.out are the components).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from valuedist.model import layers, params as params_lib, transformer
from valuedist.model.config import ModelConfig


def logit_lens(params: dict, cfg: ModelConfig, resid: jax.Array) -> jax.Array:
  """A residual-stream value [..., D] read through the final norm and unembedding: f32 [..., V]."""
  return transformer.logits_from_normed(params, layers.norm(params["final_norm"], resid, cfg), cfg)


def head_outputs(params: dict, cfg: ModelConfig, z: jax.Array) -> jax.Array:
  """Per-head contributions of an attn.z tap [L, B, T, H, Dh] through the output projection:
  [L, B, T, H, D]. Their sum over H plus the o bias is attn.out in families without post-norms."""
  o = params_lib.block_leaf(params, "attn", "o", "kernel")                     # [L, H*Dh, D]
  o = o.reshape(o.shape[0], cfg.n_heads, cfg.head_dim, o.shape[-1]).astype(jnp.float32)
  return jnp.einsum("lbthe,lhed->lbthd", z.astype(jnp.float32), o)


def logit_direction(params: dict, cfg: ModelConfig, good: jax.Array, bad: jax.Array) -> jax.Array:
  """[B, D] unembedding of good minus bad tokens (ids [B])."""
  w = transformer.unembed_kernel(params, cfg).astype(jnp.float32)
  return (w[:, good] - w[:, bad]).T


def direct_logit_attribution(params: dict, cfg: ModelConfig, contributions: jax.Array, final: jax.Array,
                             direction: jax.Array) -> jax.Array:
  """Each component's direct effect on a logit direction at one token per row.

  contributions: [..., B, D] components added to the residual stream (e.g. `head_outputs` at
  the last token, attn.out / mlp.out taps); final: [B, D] the `final` tap at the same token;
  direction: [B, D] (`logit_direction`). Returns [..., B]: component . (norm scale / rms(final)) .
  direction, with LayerNorm's centring applied to the component too."""
  f = final.astype(jnp.float32)
  c = contributions.astype(jnp.float32)
  if cfg.norm == "layer":
    f = f - f.mean(-1, keepdims=True)
    c = c - c.mean(-1, keepdims=True)
  inv_rms = jax.lax.rsqrt((f * f).mean(-1) + cfg.norm_eps)                       # [B]
  gain = cfg.norm_offset + params["final_norm"]["scale"].astype(jnp.float32)     # [D]
  return jnp.einsum("...bd,bd->...b", c, gain * direction) * inv_rms
