"""ConVA gated minimal value activation.

For each steered layer l, in order and with earlier layers' edits active, at the prompt's
last token:  s0 = logit(p0),  eps_l = max(0, (s0 - b_l - w_l.h_l) / |w_l|),
delta_l = eps_l * w_l / |w_l|, so the layer's probe then reads exactly p0 (or, in remove
mode, at most p0). The deltas are found in one prefill pass (`minimal_deltas`) and then
added at every position of prefill and every decode step (`model.AddToResidual` with
per-example vectors [B, L, D]). The gate switches the edit off per prompt.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import struct

from valuedist import model
from valuedist.config import ModelConfig


def check_p0(p0: float) -> float:
  if not 0.0 < float(p0) < 1.0:
    raise ValueError(f"p0={p0} is outside (0, 1); choose a target probability such as 0.9")
  return float(p0)


class GatedMinimalActivation(model.Intervention):
  """Prefill-time form of the ConVA edit.

  w: [L, D] probe weights (rows of unsteered layers are ignored); b: [L]; steer: [L] (1 = steer);
  s0: [] target logit; gate: [B] (1 = steer this prompt); remove: [] (1 = push down to p0).
  """
  w: jax.Array
  b: jax.Array
  steer: jax.Array
  s0: jax.Array
  gate: jax.Array
  remove: jax.Array = struct.field(default_factory=lambda: jnp.asarray(0.0))

  def residual(self, layer, h):
    w = self.w[layer].astype(jnp.float32)
    norm = jnp.maximum(jnp.linalg.norm(w), 1e-12)
    score = h[:, -1].astype(jnp.float32) @ w + self.b[layer]                  # [B]
    up = jnp.maximum(0.0, (self.s0 - score) / norm)
    down = -jnp.maximum(0.0, (score - self.s0) / norm)
    eps = jnp.where(self.remove > 0, down, up) * self.steer[layer] * self.gate
    return h + (eps[:, None, None] * (w / norm)).astype(h.dtype)


@functools.partial(jax.jit, static_argnames="cfg")
def minimal_deltas(params: dict, tokens: jax.Array, mask: jax.Array, edit: GatedMinimalActivation,
                   cfg: ModelConfig) -> jax.Array:
  """The per-prompt edits [B, L, D] (zero rows for unsteered layers or gated-off prompts),
  from one prefill pass of a left-padded batch tokens, mask [B, T]."""
  _, _, taps = model.forward(params, tokens, cfg, attention_mask=mask, intervene=edit,
                             taps=("residual", "block_out"), logits=False)
  delta = taps["residual"][:, :, -1] - taps["block_out"][:, :, -1]          # [L, B, D]
  return jnp.swapaxes(delta, 0, 1)


def steering_intervention(deltas: jax.Array) -> model.AddToResidual:
  """deltas [B, L, D] -> the intervention that adds them at every position and step."""
  return model.AddToResidual(deltas)
