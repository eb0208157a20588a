"""Matched random-direction controls for steering (STUDY_PROTOCOL rule 7).

A steering result means something only beside a control that perturbs the same sites by the
same amount in a direction that carries no value information. Every control here keeps the
method's edit *norm* per site (per layer for residual edits, per position for the anchor edit)
and replaces its *direction* by a fixed, seeded, isotropic random unit vector (one per layer
and value: a direction drawn once, like a steering vector, not fresh noise per token).

  random_directions(seed, stream, shape)        unit vectors [..., D] (f32)
  matched_norm(deltas, directions)              |deltas| along directions, per row and site
  matched_caa(vectors, directions)              CAA vectors [L, D] -> same per-layer norms
  MatchedConVA                                  ConVA's per-prompt deltas, decided by the
                                                method on the same prompt, re-pointed
"""
from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import struct

from valuedist.model import transformer
from valuedist.model.config import ModelConfig
from valuedist.values import conva

CONTROL_STREAM = 0x5EED     # folded into the seed so control directions never share a stream with sampling


def random_directions(seed: int, stream: int, shape: tuple[int, ...]) -> jax.Array:
  """Isotropic random unit vectors of `shape` [..., D] (normalised along the last axis), a
  pure function of (seed, stream) (stream: e.g. the value's or lexicon's index): the same
  value gets the same directions in every run, method and process."""
  key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), CONTROL_STREAM), stream)
  x = jax.random.normal(key, shape, jnp.float32)
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def matched_norm(deltas: jax.Array, directions: jax.Array) -> jax.Array:
  """Each edit's L2 norm (last axis) times the unit `directions` (broadcast against
  deltas' shape): deltas [B, L, D] with directions [L, D] -> [B, L, D]; a zero edit stays zero."""
  return (jnp.linalg.norm(deltas.astype(jnp.float32), axis=-1, keepdims=True) * directions).astype(deltas.dtype)


def matched_caa(vectors: jax.Array, directions: jax.Array) -> jax.Array:
  """CAA's control: vectors [L, D] -> random vectors [L, D] with the same per-layer norms
  (scaled, gated and masked by the caller exactly as the CAA vectors are)."""
  return matched_norm(vectors, directions)


class MatchedConVA(struct.PyTreeNode):
  """ConVA's control. ConVA decides per prompt and layer an edit eps_l * w_l/|w_l| in the
  prompt's prefill (each layer seeing the earlier layers' edits) and holds it for every
  token. The control first lets the method decide those edits on the same prompt
  (`conva.minimal_deltas`, one prefill pass), then adds edits of exactly those norms along
  `directions` [L, D] instead, at the same layers, prompts (gate) and positions; so the
  control's norms are the method's, not ones re-solved on the control's own trajectory.
  `on(params, tokens, mask, cfg)` gives the fixed `transformer.AddToResidual` for those prompts.
  directions may be per row ([B, L, D]) like the method's fields (`transformer.per_row`)."""
  ROW_FIELDS: ClassVar[dict[str, int]] = {"directions": 2}
  method: conva.GatedMinimalActivation
  directions: jax.Array

  def on(self, params: dict, tokens: jax.Array, mask: jax.Array, cfg: ModelConfig) -> transformer.AddToResidual:
    """The control's edit of a left-padded batch tokens, mask [B, T]: AddToResidual [B, L, D]."""
    deltas = conva.minimal_deltas(params, tokens, mask, self.method, cfg)
    return transformer.AddToResidual(matched_norm(deltas, self.directions))
