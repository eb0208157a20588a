"""The pure decoder forward and its KV cache.

`forward` is the single model definition for every family (see `families.py` for how
checkpoints map onto it). Every internal value passes a named site (`sites`), where `taps`
return it and an `Intervention` may edit it. The blocks come in one of two layouts
(`params.LAYOUTS`), chosen by the params themselves:
  stacked    one dict with a leading layer axis, run by `jax.lax.scan`: one compiled block,
             so compile time does not grow with depth (the default);
  unstacked  a tuple of per-layer dicts (`params.unstack_blocks`), run by an unrolled loop:
             each layer reads its own weight buffers, stored transposed for decoding
             (`layers.dense`), with a per-layer KV cache.
Both give the same results (greedy tokens identical, logits to f32 rounding); which is faster
is a property of the machine (bench/RESULTS.md).

Params pytree, stacked layout (L = layers; kernels are [in, out]; unstacked: the same
block leaves without the leading L, one dict per layer, each block `kernel` [in, out] stored
as `kernel_t` [out, in]):
  embed:      {embedding: [V, D]}
  pos_embed:  {embedding: [P, D]}                       (learned positions only)
  blocks:     {attn_norm, mlp_norm[, post_attn_norm, post_mlp_norm]: {scale: [L, D][, bias]},
               attn: {q: {kernel: [L, D, H*Dh][, bias]}, k, v: {kernel: [L, D, K*Dh]},
                      o: {kernel: [L, H*Dh, D]}[, q_norm, k_norm: {scale: [L, Dh]}]},
               mlp: {[gate,] up: {kernel: [L, D, F]}, down: {kernel: [L, F, D]}}}
  final_norm: {scale: [D][, bias]}
  unembed:    {kernel: [D, V]}                          (untied models only)
"""
from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from valuedist.model import layers, params as params_lib
from valuedist.model.config import ModelConfig
from valuedist.model.edits import AddToResidual  # noqa: F401  (the steering layout, used across the library)
from valuedist.model.partition import DATA, MODEL, constrain
from valuedist.model.sites import (BLOCK_SITES, SITES, TAP_NAMES, Compose, Context, Hooks,  # noqa: F401
                                   Intervention, concat_rows, per_row, site_of)


class Cache(NamedTuple):
  """KV cache. k: [L, B, K, Dh, S] (slots minor, as `layers.attend` reads keys), v: [L, B, K,
  S, Dh], or (per layer, the inference layout) tuples of L arrays [B, K, Dh, S] and [B, K, S,
  Dh]; either way k[l] is layer l's keys. key_pos: [B, S] position per slot,
  -1 if empty or pad; index: [] int32 next slot to write, or the Python int 0 of a fresh
  `init_cache` (empty at trace time: a prefill into it attends to its new keys alone instead of
  also scoring S empty slots, and never reads the buffers it writes)."""
  k: Any
  v: Any
  key_pos: jax.Array
  index: jax.Array


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None, per_layer: bool = False) -> Cache:
  """An empty cache for `batch` rows of up to `length` positions, in cfg.compute_dtype.
  per_layer: one array per layer (for unstacked params, `params.unstack_blocks`: each layer then
  writes its own buffer in place) instead of one stacked [L, ...] array (for the scan)."""
  dtype = dtype or jnp.dtype(cfg.compute_dtype)
  def zeros(shape):                   # one layer's shape -> the cache's buffers for all layers
    if per_layer:
      return tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layers))
    return jnp.zeros((cfg.n_layers,) + shape, dtype)
  k = zeros((batch, cfg.n_kv_heads, cfg.head_dim, length))
  v = zeros((batch, cfg.n_kv_heads, length, cfg.head_dim))
  return shard_cache(Cache(k, v, jnp.full((batch, length), -1, jnp.int32), 0))


def known_empty(cache: Optional[Cache]) -> bool:
  """Whether `cache` is known at trace time to hold nothing (a fresh `init_cache`)."""
  return cache is not None and type(cache.index) is int and cache.index == 0


def shard_cache(cache: Cache) -> Cache:
  """The cache's layout under the current mesh (see `partition`): rows on `data`, KV heads on
  `model` when it divides them (as the k/v kernels are split, `parallel.sharding.param_spec`),
  else whole heads on every model device."""
  kv = lambda a: constrain(a, *(None,) * (a.ndim - 4), DATA, MODEL, None, None)
  return Cache(jax.tree.map(kv, cache.k), jax.tree.map(kv, cache.v), constrain(cache.key_pos, DATA, None),
               cache.index)


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Left-padded mask [B, T] (1 = token) -> positions [B, T]; pads get 0."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def unembed_kernel(params: dict, cfg: ModelConfig) -> jax.Array:
  """[D, V] output projection (the transposed embedding when tied); V is the padded width when
  the params were padded for a model axis (columns from cfg.vocab_size on are zero)."""
  if cfg.tie_embeddings:
    return params["embed"]["embedding"].T
  return params["unembed"]["kernel"]


PADDED_LOGIT = float(np.finfo(np.float32).min)   # the logit of a padded vocabulary column


def logits_from_normed(params: dict, h: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Normed hidden [..., D] -> f32 logits [..., V], with final soft-capping. When the params'
  vocabulary was padded for a model axis (`parallel.sharding.pad_vocab`) V is the padded width
  and the columns from cfg.vocab_size on hold PADDED_LOGIT (never argmax, softmax weight 0,
  never sampled), so the logits stay split on the model axis instead of being gathered."""
  kernel = unembed_kernel(params, cfg)
  logits = jnp.einsum("...d,dv->...v", h, kernel.astype(h.dtype))
  logits = logits.astype(jnp.float32)
  if cfg.final_softcap is not None:
    logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
  if kernel.shape[1] > cfg.vocab_size:
    logits = jnp.where(jnp.arange(kernel.shape[1]) < cfg.vocab_size, logits, PADDED_LOGIT)
  return logits


def project(params: dict, h: jax.Array, cfg: ModelConfig, intervene: Optional[Intervention], positions: jax.Array,
            mask: jax.Array, prompt_len: Optional[jax.Array] = None) -> jax.Array:
  """The logits site for callers that project only some tokens of a pass: normed hidden
  h [B, T, D] at positions, mask [B, T] -> f32 logits [B, T, V], edited by `intervene` there."""
  z = logits_from_normed(params, h, cfg)
  if intervene is None or "logits" not in intervene.edit_sites():
    return z
  return intervene.edit("logits", z, Context.create(positions, mask, 0, prompt_len))


def embed(params: dict, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
  dtype = jnp.dtype(cfg.compute_dtype)
  x = params["embed"]["embedding"][tokens].astype(dtype)
  if cfg.embed_scale != 1.0:
    x = x * jnp.asarray(cfg.embed_scale, dtype)
  if cfg.learned_positions:
    x = x + params["pos_embed"]["embedding"][positions].astype(dtype)
  return x


def _block(cfg: ModelConfig, lp: dict, x: jax.Array, ctx: Context, new_key_pos: jax.Array,
           cached: Optional[tuple], sliding: jax.Array, hook: Hooks, query_block: int = 0,
           write_at: Optional[jax.Array] = None):
  """One block. x: [B, T, D]; new_key_pos: [B, T] (-1 at pads). With a cache, `cached` is
  (k [B, K, Dh, S], v [B, K, S, Dh], key_pos [B, S]) of this layer; the new keys attend to
  the slots its key_pos marks and to each other. write_at ([] int, a per-layer cache only):
  the new keys and values are first written into `cached`'s buffers at slots write_at ..
  write_at+T-1, whose key_pos must mark them empty, and the block returns those buffers.
  Each block site passes `hook`. query_block: see `layers.attend` (> 0 only where the new
  tokens' positions rise with their slots).
  Returns (block output, new k [B, K, Dh, T], new v [B, K, T, Dh]), or with write_at the
  written buffers (k [B, K, Dh, S], v [B, K, S, Dh])."""
  b, t, _ = x.shape
  a = lp["attn"]
  positions = ctx.positions
  x = hook("resid_pre", x, ctx)
  h = layers.norm(lp["attn_norm"], x, cfg)
  q = layers.dense(a["q"], h).reshape(b, t, cfg.n_heads, cfg.head_dim)
  k = layers.dense(a["k"], h).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
  v = layers.dense(a["v"], h).reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
  if cfg.qk_norm:
    q = layers.norm(a["q_norm"], q, cfg)
    k = layers.norm(a["k_norm"], k, cfg)
  if not cfg.learned_positions:
    inv_g = jnp.asarray(cfg.inv_freq, jnp.float32)
    if cfg.inv_freq_local:
      inv_freq = jnp.where(sliding, jnp.asarray(cfg.inv_freq_local, jnp.float32), inv_g)
    else:
      inv_freq = inv_g
    q = layers.rope(q, positions, inv_freq, cfg.rope_factor)
    k = layers.rope(k, positions, inv_freq, cfg.rope_factor)
  q, k, v = hook("attn.q", q, ctx), hook("attn.k", k, ctx), hook("attn.v", v, ctx)
  k, v = jnp.transpose(k, (0, 2, 3, 1)), jnp.swapaxes(v, 1, 2)  # [B, K, Dh, T], [B, K, T, Dh]
  window = None
  if cfg.any_sliding:
    big = jnp.iinfo(jnp.int32).max // 2
    window = jnp.where(sliding, cfg.sliding_window, big)
  parts = [(k, v, layers.attention_bias(positions, new_key_pos, window))]
  if cached is not None:
    k_c, v_c, pos_c = cached
    if write_at is not None:
      # The cache part reads the written buffers (its bias masks the new slots, which the new
      # part covers): reading a donated buffer before writing it in place makes XLA copy it.
      k_c, v_c = _put_kv((k_c, v_c), (k, v), write_at)
    parts.insert(0, (k_c, v_c, layers.attention_bias(positions, pos_c, window)))
  z = layers.attend(q, parts, cfg, scores_fn=hook.fn("attn.scores", ctx), pattern_fn=hook.fn("attn.pattern", ctx),
                    query_block=query_block)
  z = hook("attn.z", z, ctx)
  attn_out = layers.dense(a["o"], z.reshape(b, t, -1))
  if cfg.post_norms:
    attn_out = layers.norm(lp["post_attn_norm"], attn_out, cfg)
  x = hook("resid_mid", x + hook("attn.out", attn_out, ctx), ctx)
  mlp_out = layers.mlp(lp["mlp"], layers.norm(lp["mlp_norm"], x, cfg), cfg,
                       pre_fn=hook.fn("mlp.pre", ctx), post_fn=hook.fn("mlp.post", ctx))
  if cfg.post_norms:
    mlp_out = layers.norm(lp["post_mlp_norm"], mlp_out, cfg)
  x = hook("resid_post", x + hook("mlp.out", mlp_out, ctx), ctx)
  if write_at is not None:
    return x, k_c, v_c
  return x, k, v


def _put_kv(bufs: tuple, new: tuple, index) -> tuple:
  """(k, v) buffers (k [..., Dh, S], v [..., S, Dh]) with the new (k [..., Dh, T], v [..., T, Dh])
  written at slots index .. index+T-1, in the buffers' dtype."""
  put = lambda buf, n, slot_axis: jax.lax.dynamic_update_slice_in_dim(buf, n.astype(buf.dtype), index,
                                                                     axis=buf.ndim + slot_axis)
  return put(bufs[0], new[0], -1), put(bufs[1], new[1], -2)


def _write_cache(cache: Cache, kv_new: tuple, new_key_pos: jax.Array) -> Cache:
  """The cache with T new keys/values per layer and their positions [B, T] at slots
  cache.index .. cache.index+T-1. kv_new: for a stacked cache (k [L, B, K, Dh, T],
  v [L, B, K, T, Dh]) or sequences of L such arrays without the L; for a per-layer cache the
  layers' buffers, already written by `_unrolled_blocks`."""
  if isinstance(cache.k, tuple):
    k, v = tuple(kv_new[0]), tuple(kv_new[1])
  else:
    stack = lambda new: jnp.stack(new) if isinstance(new, (tuple, list)) else new
    k, v = _put_kv((cache.k, cache.v), (stack(kv_new[0]), stack(kv_new[1])), cache.index)
  key_pos = jax.lax.dynamic_update_slice_in_dim(cache.key_pos, new_key_pos, cache.index, axis=1)
  index = jnp.asarray(cache.index + new_key_pos.shape[1], jnp.int32)
  return Cache(k, v, key_pos, index)


def _scanned_blocks(cfg, blocks, x, ctx, new_key_pos, cache, hooks, query_block):
  """All blocks of stacked params by `lax.scan`: one compiled block whatever the depth.
  Returns (x [B, T, D], block taps stacked [L, ...], new (k [L, B, K, Dh, T], v [L, B, K, T, Dh]) or None)."""
  sliding = jnp.asarray(cfg.layer_sliding or (False,) * cfg.n_layers)
  layer_ids = jnp.arange(cfg.n_layers, dtype=jnp.int32)

  # Each layer reads its cache slice (scan xs) and emits only its T new keys/values (ys);
  # they are written into the cache once, after the scan, in place under the sampler's
  # loop. Carrying or re-emitting the whole cache would copy all of it at every step.
  # A cache known to be empty is not read at all.
  read_cache = cache is not None and not known_empty(cache)

  def step_fn(x, xs):
    lp, layer, slide, k_l, v_l = xs
    cached = (k_l, v_l, cache.key_pos) if read_cache else None
    hooks.rec = {}
    x, k_new, v_new = _block(cfg, lp, x, ctx._replace(layer=layer), new_key_pos, cached, slide, hooks, query_block)
    x = constrain(x, DATA, None, None)
    return x, (hooks.rec, (k_new, v_new) if cache is not None else None)

  kv = (cache.k, cache.v) if read_cache else (None, None)
  x, (block_taps, kv_new) = jax.lax.scan(step_fn, x, (blocks, layer_ids, sliding) + kv)
  return x, block_taps, kv_new


def _unrolled_blocks(cfg, blocks, x, ctx, new_key_pos, cache, hooks, query_block):
  """All blocks of unstacked params (a tuple of per-layer dicts) in a Python loop: each layer
  reads its own weight buffers, so no step copies a layer's slice out of a stack. A per-layer
  cache is written in place by each layer (`_block`'s write_at), which then attends to the
  written buffer. Same returns as `_scanned_blocks`, except that with a per-layer cache the
  new k, v are the layers' written buffers."""
  recs, ks, vs = [], [], []
  read_cache = cache is not None and not known_empty(cache)
  per_layer = cache is not None and isinstance(cache.k, tuple)
  write_at = cache.index if per_layer and read_cache else None
  key_pos = cache.key_pos if read_cache else None
  if write_at is not None:    # the slots this call writes belong to the new part, not the cache part
    slot = jnp.arange(key_pos.shape[1])
    key_pos = jnp.where((slot >= write_at) & (slot < write_at + new_key_pos.shape[1]), -1, key_pos)
  for i, lp in enumerate(blocks):
    cached = (cache.k[i], cache.v[i], key_pos) if read_cache else None
    slide = jnp.asarray(cfg.layer_sliding[i] if cfg.layer_sliding else False)
    hooks.rec = {}
    x, k_new, v_new = _block(cfg, lp, x, ctx._replace(layer=jnp.int32(i)), new_key_pos, cached, slide, hooks,
                             query_block, write_at)
    if per_layer and not read_cache:     # a fresh cache: written, not read
      k_new, v_new = _put_kv((cache.k[i], cache.v[i]), (k_new, v_new), cache.index)
    x = constrain(x, DATA, None, None)
    recs.append(hooks.rec)
    ks.append(k_new)
    vs.append(v_new)
  block_taps = jax.tree.map(lambda *a: jnp.stack(a), *recs) if recs[0] else {}
  kv_new = (ks, vs) if cache is not None else None
  return x, block_taps, kv_new


def forward(params: dict, tokens: jax.Array, cfg: ModelConfig, *,
            positions: Optional[jax.Array] = None,
            attention_mask: Optional[jax.Array] = None,
            cache: Optional[Cache] = None,
            taps: tuple[str, ...] = (),
            tap_last: bool = False,
            intervene: Optional[Intervention] = None,
            logits: bool = True,
            step=0,
            prompt_len: Optional[jax.Array] = None) -> tuple[Optional[jax.Array], Optional[Cache], dict[str, Any]]:
  """Runs the decoder.

  tokens: [B, T] int; attention_mask: [B, T] (1 = token, 0 = left pad; default all ones);
  positions: [B, T] (default from the mask). With `cache`, the T new tokens are written at
  slots cache.index .. cache.index+T-1 and attend to everything cached before them.
  taps: site names (`sites.TAP_NAMES`) to return; nothing else is kept. Block sites come
  stacked [L, ...], the others as the site's shape. tap_last: keep only each tap's last token.
  intervene: edits at its `edit_sites()`. step: [] 0 for a prefill or teacher-forced pass, k at
  decode step k; prompt_len: [B] prompt lengths (default from the mask and step), both only
  for the edits' `Context`. `logits=False` skips the vocabulary projection.
  Returns (logits [B, T, V] f32 or None, updated cache or None, taps dict).
  `cfg` is static under jit: use `jax.jit(forward, static_argnames=('cfg', 'taps', 'tap_last', 'logits'))`.
  """
  hooks = Hooks(intervene, tuple(taps), tap_last)
  if "logits" in {site_of(n) for n in taps} and not logits:
    raise ValueError("the logits tap needs logits=True")
  b, t = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  query_block = layers.QUERY_BLOCK if positions is None else 0     # positions from the mask rise with the slots
  if positions is None:
    positions = positions_from_mask(attention_mask)
  new_key_pos = jnp.where(attention_mask > 0, positions, -1).astype(jnp.int32)
  ctx = Context.create(positions, attention_mask, step, prompt_len)

  x = hooks("embed", embed(params, tokens, positions, cfg), ctx)
  embed_taps = hooks.rec
  if params_lib.layout_of(params) == "unstacked":
    x, block_taps, kv_new = _unrolled_blocks(cfg, params["blocks"], x, ctx, new_key_pos, cache, hooks, query_block)
  elif cache is not None and isinstance(cache.k, tuple):
    raise ValueError("a per-layer cache needs unstacked params (valuedist.model.params.unstack_blocks) or "
                     "init_cache(..., per_layer=False)")
  else:
    x, block_taps, kv_new = _scanned_blocks(cfg, params["blocks"], x, ctx, new_key_pos, cache, hooks, query_block)
  hooks.rec = out_taps = {**embed_taps, **block_taps}
  x = hooks("final", x, ctx)
  h = hooks("final_normed", layers.norm(params["final_norm"], x, cfg), ctx)
  new_cache = None if cache is None else shard_cache(_write_cache(cache, kv_new, new_key_pos))
  z = hooks("logits", logits_from_normed(params, h, cfg), ctx) if logits else None
  return z, new_cache, {n: out_taps[n] for n in taps}


def param_count(params: dict) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
