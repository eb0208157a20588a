"""Small pure building blocks of the decoder: norms, RoPE, attention, MLP.

Each takes plain arrays and a `ModelConfig`; none holds state.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from valuedist.model.config import ModelConfig

NEG_INF = -1e30  # finite, so a fully masked row (a pad query) gives no NaN


def norm(p: dict, x: jax.Array, cfg: ModelConfig) -> jax.Array:
  """RMSNorm or LayerNorm over the last axis, computed in f32. p: {'scale'[, 'bias']}."""
  dtype = x.dtype
  x = x.astype(jnp.float32)
  if cfg.norm == "layer":
    x = x - x.mean(-1, keepdims=True)
  x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps)
  x = x * (cfg.norm_offset + p["scale"].astype(jnp.float32))
  if "bias" in p:
    x = x + p["bias"].astype(jnp.float32)
  return x.astype(dtype)


def activation(x: jax.Array, name: str) -> jax.Array:
  if name == "silu":
    return jax.nn.silu(x)
  return jax.nn.gelu(x, approximate=(name == "gelu_tanh"))


# A product with a transposed kernel [O, I] puts the weight on the left up to this many rows,
# for kernels of at least this many bytes (ones streamed from memory, not from cache).
WEIGHT_LEFT_ROWS = 256
WEIGHT_LEFT_MIN_BYTES = 256 * 1024


def dense(p: dict, x: jax.Array) -> jax.Array:
  """x[..., I] @ kernel[I, O] (+ bias[O]), or with `kernel_t` [O, I] (the unstacked layout,
  `params.unstack_blocks`) the same product. For up to WEIGHT_LEFT_ROWS rows (decoding, short
  prefills) and a kernel of WEIGHT_LEFT_MIN_BYTES or more, the weight goes on the left,
  (kernel_t @ x^T)^T, which XLA's CPU matmul streams from memory faster than x @ kernel (a
  30-layer chain of the SmolLM2 MLP at 8-256 rows: 7-27% less time; bench/RESULTS.md). The
  optimization barriers keep XLA from folding the two transposes back into the product's
  operands, which undoes the gain. Otherwise a plain product with the transposed operand, as
  fast as x @ kernel at 4,096 rows. At the SmolLM2 shapes measured both forms gave products
  bitwise equal to x @ kernel; that is not guaranteed (tiny shapes sum in another order, ~5e-7)."""
  if "kernel_t" in p:
    y = _times_transposed(p["kernel_t"].astype(x.dtype), x)
  else:
    y = jnp.einsum("...i,io->...o", x, p["kernel"].astype(x.dtype))
  if "bias" in p:
    y = y + p["bias"].astype(x.dtype)
  return y


def _times_transposed(w: jax.Array, x: jax.Array) -> jax.Array:
  """x [..., I] times a kernel stored transposed, w [O, I] -> [..., O], in the form `dense` picks."""
  rows = math.prod(x.shape[:-1])
  if rows <= WEIGHT_LEFT_ROWS and w.size * w.dtype.itemsize >= WEIGHT_LEFT_MIN_BYTES:
    barrier = jax.lax.optimization_barrier
    return barrier(w @ barrier(x.reshape(rows, -1).T)).T.reshape(*x.shape[:-1], w.shape[0])
  return jnp.einsum("...i,oi->...o", x, w)


def rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array, factor: float) -> jax.Array:
  """Rotate-half RoPE. x: [B, T, N, Dh]; positions: [B, T]; inv_freq: [Dh/2]."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, Dh/2]
  angles = jnp.concatenate([angles, angles], -1)[:, :, None, :]
  cos, sin = jnp.cos(angles) * factor, jnp.sin(angles) * factor
  xf = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], -1)
  return (xf * cos + rotated * sin).astype(x.dtype)


def attention_bias(q_pos: jax.Array, k_pos: jax.Array, window: jax.Array | None) -> jax.Array:
  """Additive mask [B, 1, 1, T, S] from positions; k_pos < 0 marks empty or pad slots.

  Causality is by position, which equals causality by slot for left-padded batches.
  `window` (traced scalar, or None): keys with q_pos - k_pos >= window are masked.
  """
  q = q_pos[:, :, None]
  k = k_pos[:, None, :]
  ok = (k >= 0) & (k <= q)
  if window is not None:
    ok = ok & (k > q - window)
  return jnp.where(ok, 0.0, NEG_INF)[:, None, None, :, :]


QUERY_BLOCK = 64        # least queries per block of causal self-attention (`attend`); 0 = no blocks
MAX_QUERY_BLOCKS = 4    # most blocks: n blocks score (n + 1) / 2n of the keys (4: 62%, 8: 56%), and each
                        # adds compiled kernels (about 0.15 s of compile apiece on the CPU)


def attend(q: jax.Array, parts, cfg: ModelConfig, scores_fn=None, pattern_fn=None, query_block: int = 0) -> jax.Array:
  """Grouped-query attention of q [B, T, H, Dh] with one softmax over the keys of several
  parts, each (k [B, K, Dh, S_i], v [B, K, S_i, Dh], bias [B, 1, 1, T, S_i]) -> [B, T, H, Dh].

  Decoding uses two parts, the cache and the T new keys, so the new keys are never written
  into a copy of the cache. The queries of each kv head are stacked as [B, K, G·T, Dh]
  (G = H/K) and keys laid out slots-minor [B, K, Dh, S], values [B, K, S, Dh], so both
  contractions are plain batched matmuls over (B, K) whose right operands are read as stored,
  with no transpose of the scores (30 layers of decode attention with keys [B, K, S, Dh] ran
  1.3-2.2x slower at B = 8-128: bench/RESULTS.md). scores_fn / pattern_fn (optional) see and
  may replace the masked pre-softmax scores and the softmax, both f32 [B, H, T, S] over all
  parts' keys (head h = kv * H/K + g, the grouping of q).

  query_block (> 0): the last part's keys are the queries' own tokens and none is seen by a
  query in an earlier slot (positions rising with the slots, as in left- or right-padded
  batches), so queries [i, j) need only its first j keys. Attention then runs in blocks of
  max(query_block, T / MAX_QUERY_BLOCKS) queries and skips up to 3/8 of the scores of a long
  T. A real token's output equals the unblocked one up to summation order (the keys skipped
  weigh exactly 0); a pad query's (whose keys may all be masked) is another average of values,
  read by nothing. Not with scores_fn / pattern_fn, which see the whole [B, H, T, S]."""
  b, t, h, dh = q.shape
  if 0 < query_block < t and scores_fn is None and pattern_fn is None:
    *rest, (k, v, bias) = parts
    size = max(query_block, -(-t // MAX_QUERY_BLOCKS))
    outs = []
    for i in range(0, t, size):
      j = min(i + size, t)
      block = [(kr, vr, br[..., i:j, :]) for kr, vr, br in rest] + [(k[..., :j], v[:, :, :j], bias[..., i:j, :j])]
      outs.append(attend(q[:, i:j], block, cfg))
    return jnp.concatenate(outs, 1)
  kv = parts[0][0].shape[1]
  g = h // kv
  q = q.reshape(b, t, kv, g, dh).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, dh)   # [B, K, G·T, Dh]
  scores = []
  for k, _, bias in parts:
    s = jnp.einsum("bkqd,bkds->bkqs", q, k.astype(q.dtype)).astype(jnp.float32) * cfg.scale
    if cfg.attn_softcap is not None:
      s = jnp.tanh(s / cfg.attn_softcap) * cfg.attn_softcap
    scores.append(s.reshape(b, kv, g, t, -1) + bias)
  scores = jnp.concatenate(scores, -1) if len(parts) > 1 else scores[0]    # [B, K, G, T, S]
  grouped = scores.shape
  if scores_fn is not None:
    scores = scores_fn(scores.reshape(b, h, t, -1)).reshape(grouped)
  probs = jax.nn.softmax(scores, axis=-1)
  if pattern_fn is not None:
    probs = pattern_fn(probs.reshape(b, h, t, -1)).reshape(grouped)
  probs = probs.reshape(b, kv, g * t, -1)
  out, start = 0.0, 0
  for k, v, _ in parts:
    p = jax.lax.slice_in_dim(probs, start, start + v.shape[2], axis=-1).astype(q.dtype)
    out = out + jnp.einsum("bkqs,bksd->bkqd", p, v.astype(q.dtype))
    start += v.shape[2]
  return out.reshape(b, kv, g, t, dh).transpose(0, 3, 1, 2, 4).reshape(b, t, h, dh)


def mlp(p: dict, x: jax.Array, cfg: ModelConfig, pre_fn=None, post_fn=None) -> jax.Array:
  """Gated (gate, up, down) or plain (up, down) MLP. x: [B, T, D]. pre_fn / post_fn
  (optional) see and may replace the hidden [B, T, F] before the nonlinearity (the gate's
  pre-activation when gated) and after it (act(gate) * up when gated)."""
  keep = lambda f, a: a if f is None else f(a)
  up = dense(p["up"], x)
  if cfg.gated_mlp:
    hidden = keep(post_fn, activation(keep(pre_fn, dense(p["gate"], x)), cfg.activation) * up)
  else:
    hidden = keep(post_fn, activation(keep(pre_fn, up), cfg.activation))
  return dense(p["down"], hidden)
