"""The pure decoder forward, its KV cache, taps and intervention sites.

`forward` is the single model definition for every family (see `families.py` for how
checkpoints map onto it). Blocks are stacked on a leading layer axis and run with
`jax.lax.scan`, so compile time does not grow with depth.

Params pytree (L = layers; kernels are [in, out]):
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

import dataclasses
from typing import Any, ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct
from jax.sharding import PartitionSpec

from valuedist.model import layers
from valuedist.model.partition import DATA, MODEL, constrain
from valuedist.model.config import ModelConfig

# Names of what `forward(..., taps=...)` can return.
BLOCK_TAPS = ("residual", "block_out", "attn_out", "mlp_out")   # each [L, B, T, D]
# residual: a block's output after the intervention at that layer; block_out: before it.
FINAL_TAPS = ("final_hidden", "final_normed")      # each [B, T, D]
TAP_NAMES = BLOCK_TAPS + FINAL_TAPS


class Cache(NamedTuple):
  """KV cache. k, v: [L, B, K, S, Dh]; key_pos: [B, S] position per slot, -1 if empty or pad;
  index: [] next slot to write."""
  k: jax.Array
  v: jax.Array
  key_pos: jax.Array
  index: jax.Array


def init_cache(cfg: ModelConfig, batch: int, length: int, dtype=None) -> Cache:
  """An empty cache for `batch` rows of up to `length` positions, in cfg.compute_dtype."""
  dtype = dtype or jnp.dtype(cfg.compute_dtype)
  shape = (cfg.n_layers, batch, cfg.n_kv_heads, length, cfg.head_dim)
  return shard_cache(Cache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype),
                           jnp.full((batch, length), -1, jnp.int32), jnp.zeros((), jnp.int32)))


def shard_cache(cache: Cache) -> Cache:
  """The cache's layout under the current mesh (see `partition`): rows on `data`, KV heads on
  `model` when it divides them (as the k/v kernels are split, `parallel.sharding.param_spec`),
  else whole heads on every model device."""
  kv = lambda a: constrain(a, None, DATA, MODEL, None, None)
  return Cache(kv(cache.k), kv(cache.v), constrain(cache.key_pos, DATA, None), cache.index)


class Intervention(struct.PyTreeNode):
  """Base of all interventions: a pytree whose arrays are traced and whose class is static.

  Subclasses override the sites they edit. `residual` runs on each block's output
  (h: [B, T, D], layer: traced int32 index), `final` on the last block's output before
  the final norm, `normed` after it, and `logits` on the f32 logits. Both run at every position of
  prefill and every decode step, inside the compiled program.

  ROW_FIELDS {field: ndim of its shared form}: fields that may carry one value per batch row
  on a leading axis (they do when their ndim is larger), so a data-parallel program splits
  them with the rows (`row_specs`, `sampler.generate_data_parallel`).
  """
  ROW_FIELDS: ClassVar[dict[str, int]] = {}

  def row_specs(self) -> "Intervention":
    """This intervention with every array leaf replaced by its PartitionSpec in a program whose
    rows are split on `data`: P(DATA) where a ROW_FIELDS field carries rows, P() (the same
    on every shard) elsewhere; nested interventions answer for themselves."""
    def spec(name, v):
      if isinstance(v, Intervention):
        return v.row_specs()
      if isinstance(v, tuple) and v and all(isinstance(p, Intervention) for p in v):
        return tuple(p.row_specs() for p in v)
      rows = name in self.ROW_FIELDS and getattr(v, "ndim", 0) > self.ROW_FIELDS[name]
      return jax.tree.map(lambda _: PartitionSpec(DATA) if rows else PartitionSpec(), v)
    return self.replace(**{f.name: spec(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)
                           if f.metadata.get("pytree_node", True)})

  @property
  def prefill_taps(self) -> tuple[str, ...]:
    """Taps (names from TAP_NAMES) that `after_prefill` needs from the prefill pass."""
    return ()

  def after_prefill(self, taps: dict) -> "Intervention":
    """The intervention to apply at decode steps, given the prefill's `prefill_taps` at the
    prompt's last position (block taps [L, B, D], final taps [B, D]). Default: itself.
    An edit decided once per prompt (ConVA) computes it in prefill and returns a fixed one."""
    return self

  def residual(self, layer: jax.Array, h: jax.Array) -> jax.Array:
    return h

  def final(self, h: jax.Array) -> jax.Array:
    return h

  def normed(self, h: jax.Array) -> jax.Array:
    return h

  def logits(self, z: jax.Array) -> jax.Array:
    """Edits f32 logits [..., V] (e.g. a static logit bias baseline)."""
    return z


class AddToResidual(Intervention):
  """Adds scale * vectors[layer] to the residual stream after each block.

  vectors: [L, D] or [B, L, D] (per-example vectors, e.g. per-prompt ConVA edits); rows
  of layers that should stay untouched are zero. scale: [] or [B].
  """
  ROW_FIELDS: ClassVar[dict[str, int]] = {"vectors": 2, "scale": 0}
  vectors: jax.Array
  scale: jax.Array = struct.field(default_factory=lambda: jnp.ones(()))

  def delta(self, layer, h):
    """What is added after block `layer`: [D] or [B, 1, D], broadcastable against h [B, T, D]."""
    v = self.vectors[..., layer, :]               # [D] or [B, D]
    if v.ndim == 2:
      v = v[:, None, :]
    s = jnp.asarray(self.scale)
    s = s[:, None, None] if s.ndim == 1 else s
    return s * v

  def residual(self, layer, h):
    return h + self.delta(layer, h).astype(h.dtype)


class Compose(Intervention):
  """Applies several interventions in order."""
  parts: tuple

  @property
  def prefill_taps(self):
    return tuple(dict.fromkeys(n for p in self.parts for n in p.prefill_taps))

  def after_prefill(self, taps):
    return Compose(tuple(p.after_prefill(taps) for p in self.parts))

  def residual(self, layer, h):
    for p in self.parts:
      h = p.residual(layer, h)
    return h

  def final(self, h):
    for p in self.parts:
      h = p.final(h)
    return h

  def normed(self, h):
    for p in self.parts:
      h = p.normed(h)
    return h

  def logits(self, z):
    for p in self.parts:
      z = p.logits(z)
    return z


def _row_fields(iv):
  """(name, value, per-row ndim or None) of each pytree field of an intervention-like struct
  (anything with ROW_FIELDS: interventions, and controls that resolve into one)."""
  for f in dataclasses.fields(iv):
    if f.metadata.get("pytree_node", True):
      yield f.name, getattr(iv, f.name), iv.ROW_FIELDS.get(f.name)


def _nested(v) -> bool:
  return hasattr(v, "ROW_FIELDS") or (isinstance(v, tuple) and bool(v) and all(hasattr(p, "ROW_FIELDS") for p in v))


def per_row(iv, n: int):
  """`iv` with every ROW_FIELDS field in its per-row form, a leading axis of n rows (a shared
  field broadcast; nested interventions too), so interventions of different conditions
  concatenate into one batch (`concat_rows`)."""
  def one(name, v, shared_ndim):
    if _nested(v):
      return tuple(per_row(p, n) for p in v) if isinstance(v, tuple) else per_row(v, n)
    if shared_ndim is None or v is None:
      return v
    v = jnp.asarray(v)
    return jnp.broadcast_to(v, (n,) + v.shape) if v.ndim == shared_ndim else v
  return iv.replace(**{name: one(name, v, nd) for name, v, nd in _row_fields(iv)})


def concat_rows(parts: list, batch: int):
  """One intervention for a batch of `batch` rows from parts of one class, each in its
  per-row form (`per_row`) for its own consecutive rows: ROW_FIELDS fields concatenated (the
  rows past the parts repeat the last row; they are padding), every other field taken from
  the first part (they must agree: same shapes)."""
  first = parts[0]
  def one(name, vs, shared_ndim):
    if _nested(vs[0]):
      if isinstance(vs[0], tuple):
        return tuple(concat_rows([v[i] for v in vs], batch) for i in range(len(vs[0])))
      return concat_rows(list(vs), batch)
    if shared_ndim is None or vs[0] is None:
      shapes = {jnp.shape(v) for v in jax.tree.leaves(vs)} if vs[0] is not None else set()
      if len(shapes) > 1 or any(type(v) is not type(vs[0]) for v in vs):
        raise ValueError(f"{type(first).__name__}.{name} differs between the parts of one batch; it is not per row")
      return vs[0]
    x = jnp.concatenate(vs)
    if x.shape[0] > batch:
      raise ValueError(f"{x.shape[0]} rows do not fit a batch of {batch}")
    return jnp.concatenate([x, jnp.repeat(x[-1:], batch - x.shape[0], 0)])
  fields = list(_row_fields(first))
  return first.replace(**{name: one(name, [getattr(p, name) for p in parts], nd) for name, _, nd in fields})


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


def embed(params: dict, tokens: jax.Array, positions: jax.Array, cfg: ModelConfig) -> jax.Array:
  dtype = jnp.dtype(cfg.compute_dtype)
  x = params["embed"]["embedding"][tokens].astype(dtype)
  if cfg.embed_scale != 1.0:
    x = x * jnp.asarray(cfg.embed_scale, dtype)
  if cfg.learned_positions:
    x = x + params["pos_embed"]["embedding"][positions].astype(dtype)
  return x


def _block(cfg: ModelConfig, lp: dict, x: jax.Array, positions: jax.Array, new_key_pos: jax.Array,
           cached: Optional[tuple], sliding: jax.Array):
  """One block. x: [B, T, D]; new_key_pos: [B, T] (-1 at pads). With a cache, `cached` is
  (k [B, K, S, Dh], v [B, K, S, Dh], key_pos [B, S]) of this layer before this call; the new
  keys attend to it and to each other.
  Returns (block output, attn_out, mlp_out, new k, new v), the new k, v: [B, K, T, Dh]."""
  b, t, _ = x.shape
  a = lp["attn"]
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
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)           # [B, K, T, Dh]
  window = None
  if cfg.any_sliding:
    big = jnp.iinfo(jnp.int32).max // 2
    window = jnp.where(sliding, cfg.sliding_window, big)
  parts = [(k, v, layers.attention_bias(positions, new_key_pos, window))]
  if cached is not None:
    k_c, v_c, pos_c = cached
    parts.insert(0, (k_c, v_c, layers.attention_bias(positions, pos_c, window)))
  attn = layers.attend(q, parts, cfg)
  attn_out = layers.dense(a["o"], attn.reshape(b, t, -1))
  if cfg.post_norms:
    attn_out = layers.norm(lp["post_attn_norm"], attn_out, cfg)
  x = x + attn_out
  mlp_out = layers.mlp(lp["mlp"], layers.norm(lp["mlp_norm"], x, cfg), cfg)
  if cfg.post_norms:
    mlp_out = layers.norm(lp["post_mlp_norm"], mlp_out, cfg)
  x = x + mlp_out
  return x, attn_out, mlp_out, k, v


def _write_cache(cache: Cache, kv_new: tuple[jax.Array, jax.Array], new_key_pos: jax.Array) -> Cache:
  """The cache with T new keys/values [L, B, K, T, Dh] and their positions [B, T] written at
  slots cache.index .. cache.index+T-1."""
  at = (0, 0, 0, cache.index, 0)
  key_pos = jax.lax.dynamic_update_slice_in_dim(cache.key_pos, new_key_pos, cache.index, axis=1)
  return Cache(jax.lax.dynamic_update_slice(cache.k, kv_new[0].astype(cache.k.dtype), at),
               jax.lax.dynamic_update_slice(cache.v, kv_new[1].astype(cache.v.dtype), at),
               key_pos, cache.index + new_key_pos.shape[1])


def forward(params: dict, tokens: jax.Array, cfg: ModelConfig, *,
            positions: Optional[jax.Array] = None,
            attention_mask: Optional[jax.Array] = None,
            cache: Optional[Cache] = None,
            taps: tuple[str, ...] = (),
            tap_last: bool = False,
            intervene: Optional[Intervention] = None,
            logits: bool = True) -> tuple[Optional[jax.Array], Optional[Cache], dict[str, Any]]:
  """Runs the decoder.

  tokens: [B, T] int; attention_mask: [B, T] (1 = token, 0 = left pad; default all ones);
  positions: [B, T] (default from the mask). With `cache`, the T new tokens are written at
  slots cache.index .. cache.index+T-1 and attend to everything cached before them.
  taps: names from TAP_NAMES to return; nothing else is kept. tap_last: keep only the last
  position of each tap (block taps [L, B, D], final taps [B, D]). `logits=False` skips the
  vocabulary projection (e.g. when only taps are wanted).
  Returns (logits [B, T, V] f32 or None, updated cache or None, taps dict).
  `cfg` is static under jit: use `jax.jit(forward, static_argnames=('cfg', 'taps', 'tap_last', 'logits'))`.
  """
  unknown = set(taps) - set(TAP_NAMES)
  if unknown:
    raise ValueError(f"unknown taps {sorted(unknown)}; available: {', '.join(TAP_NAMES)}")
  b, t = tokens.shape
  if attention_mask is None:
    attention_mask = jnp.ones((b, t), jnp.int32)
  if positions is None:
    positions = positions_from_mask(attention_mask)
  new_key_pos = jnp.where(attention_mask > 0, positions, -1).astype(jnp.int32)
  intervene = intervene or Intervention()
  keep = (lambda a: a[..., -1, :]) if tap_last else (lambda a: a)

  x = embed(params, tokens, positions, cfg)
  sliding = jnp.asarray(cfg.layer_sliding or (False,) * cfg.n_layers)
  layer_ids = jnp.arange(cfg.n_layers, dtype=jnp.int32)

  # Each layer reads its cache slice (scan xs) and emits only its T new keys/values (ys);
  # they are written into the cache once, after the scan, in place under the sampler's
  # loop. Carrying or re-emitting the whole cache would copy all of it at every step.
  def step(x, xs):
    lp, layer, slide, k_l, v_l = xs
    cached = None if cache is None else (k_l, v_l, cache.key_pos)
    block_out, attn_out, mlp_out, k_new, v_new = _block(cfg, lp, x, positions, new_key_pos, cached, slide)
    x = constrain(intervene.residual(layer, block_out), DATA, None, None)
    outs = {"residual": x, "block_out": block_out, "attn_out": attn_out, "mlp_out": mlp_out}
    return x, ({n: keep(outs[n]) for n in BLOCK_TAPS if n in taps},
               (k_new, v_new) if cache is not None else None)

  cached = (cache.k, cache.v) if cache is not None else (None, None)
  x, (block_taps, kv_new) = jax.lax.scan(step, x, (params["blocks"], layer_ids, sliding) + cached)

  out_taps = dict(block_taps)
  x = intervene.final(x)
  if "final_hidden" in taps:
    out_taps["final_hidden"] = keep(x)
  h = intervene.normed(layers.norm(params["final_norm"], x, cfg))
  if "final_normed" in taps:
    out_taps["final_normed"] = keep(h)
  new_cache = None if cache is None else shard_cache(_write_cache(cache, kv_new, new_key_pos))
  z = intervene.logits(logits_from_normed(params, h, cfg)) if logits else None
  return z, new_cache, out_taps


def param_count(params: dict) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))
