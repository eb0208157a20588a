"""Generic edits at named sites: add, set, scale, ablate, patch, each selected by `Where`.

All are `sites.Intervention` pytrees: their arrays (values, coefficients, masks) are traced,
so one compiled program serves every coefficient and selection of one shape; they compose
with `sites.Compose`. A value with a leading layer axis (`per_layer=True`, [L, ...]) gives
each block its own slice. Values broadcast against the site's value (`sites.LAYOUT`), so a
per-row value is simply one with a leading B axis.

  Add(site, value, where, scale)     x + scale * value
  Set(site, value, where)            value
  Scale(site, factor, where)         factor * x
  Ablate(site, where[, mean])        0, or the given mean (mean-ablation)
  Patch(site, source, where)         the value a cached run had at the same position relative to
                                     the end of its prompt (activation patching)
  AddToResidual(vectors, scale, where)  the steering vector layout ([L, D] or [B, L, D]) at resid_post
"""
from __future__ import annotations

from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import struct

from valuedist.model import sites
from valuedist.model.sites import BLOCK_SITES, LAYOUT, Context, Intervention


class Where(struct.PyTreeNode):
  """Where an edit acts; None means everywhere along that axis. Masks are 1 = edit.

  layers:    [L] over blocks (block sites only), or [B, L] per row
  positions: [P] or [B, P] positions to edit: absolute, or relative to the end of the prompt
             when `relative` (-1 = the prompt's last token, 0 = the first generated token), so
             left padding never shifts an edit
  heads:     [H] or [B, H] over the head axis (attn.q / attn.z / scores / pattern: query heads;
             attn.k / attn.v: KV heads)
  features:  [F] or [B, F] over the last axis of [B, T, F]-shaped sites (D, MLP neurons, V)
  span:      [2] or [B, 2] a half-open range [start, stop) of positions (relative when
             `relative`): e.g. (-2**30, 0) relative is the whole prompt and no generated token
  steps:     [N] the steps to act at (0 = prefill, k = decode step k)
  rows:      [B] batch rows
  Pads (mask 0) are never edited.
  """
  ROW_FIELDS: ClassVar[dict[str, int]] = {"layers": 1, "positions": 1, "span": 1, "heads": 1, "features": 1,
                                          "rows": 0}
  layers: Optional[jax.Array] = None
  positions: Optional[jax.Array] = None
  span: Optional[jax.Array] = None
  heads: Optional[jax.Array] = None
  features: Optional[jax.Array] = None
  steps: Optional[jax.Array] = None
  rows: Optional[jax.Array] = None
  relative: bool = struct.field(pytree_node=False, default=False)

  def tokens(self, ctx: Context) -> jax.Array:
    """[B, T] bool: the tokens of this call to edit (layers, rows and steps folded in)."""
    sel = ctx.mask > 0
    pos = ctx.relative if self.relative else ctx.positions
    if self.positions is not None:
      want = jnp.asarray(self.positions)
      if want.ndim == 1:
        sel = sel & jnp.isin(pos, want)
      else:
        sel = sel & jnp.any(pos[:, :, None] == want[:, None, :], -1)
    if self.span is not None:
      span = jnp.asarray(self.span)
      start, stop = (span[0], span[1]) if span.ndim == 1 else (span[:, :1], span[:, 1:])
      sel = sel & (pos >= start) & (pos < stop)
    if self.rows is not None:
      sel = sel & (jnp.asarray(self.rows) > 0)[:, None]
    if self.steps is not None:
      sel = sel & jnp.isin(ctx.step, jnp.asarray(self.steps))
    if self.layers is not None and ctx.layer is not None:
      on = jnp.asarray(self.layers)[..., ctx.layer] > 0                       # [] or [B]
      sel = sel & (on[:, None] if on.ndim == 1 else on)
    return sel

  def mask(self, site: str, ctx: Context, ndim: int) -> jax.Array:
    """A bool mask broadcastable against the site's value of `ndim` axes."""
    layout = LAYOUT[site]
    t = layout.index("t")
    m = jnp.expand_dims(self.tokens(ctx), tuple(i for i in range(ndim) if i not in (0, t)))
    for field, axis_names in ((self.heads, "hk"), (self.features, "dfv")):
      if field is None:
        continue
      axis = next((i for i, a in enumerate(layout) if a in axis_names), None)
      if axis is None:
        raise ValueError(f"site {site} has no {'head' if axis_names == 'hk' else 'feature'} axis to select "
                         f"(layout {layout}); drop that selection for this site")
      f = jnp.asarray(field) > 0
      if f.ndim == 1:
        f = jnp.expand_dims(f, tuple(i for i in range(ndim) if i != axis))
      else:                                                                  # [B, n] per row
        f = jnp.expand_dims(f, tuple(i for i in range(1, ndim) if i != axis))
      m = m & f
    return m


class SiteEdit(Intervention):
  """Base of the generic edits: one site, a selection, `apply(x, selected, ctx)`."""
  site: str = struct.field(pytree_node=False, default="resid_post")
  where: Where = struct.field(default_factory=Where)

  def __post_init__(self):
    sites.check_sites((self.site,), "sites")

  def edit_sites(self):
    return (self.site,)

  def edit(self, site, x, ctx):
    if site != self.site:
      return x
    return self.apply(x, self.where.mask(site, ctx, x.ndim), ctx)

  def apply(self, x, selected, ctx):
    raise NotImplementedError

  def _value(self, v, ctx, per_layer: bool):
    v = jnp.asarray(v)
    if per_layer:
      if ctx.layer is None:
        raise ValueError(f"a per-layer value needs a block site, not {self.site}")
      v = v[ctx.layer]
    return v


class Add(SiteEdit):
  """x + scale * value at the selected entries. value broadcasts against the site value (or
  its [L, ...] stack with per_layer)."""
  value: jax.Array = None
  scale: jax.Array = struct.field(default_factory=lambda: jnp.ones(()))
  per_layer: bool = struct.field(pytree_node=False, default=False)

  def apply(self, x, selected, ctx):
    delta = jnp.asarray(self.scale) * self._value(self.value, ctx, self.per_layer)
    return x + jnp.where(selected, delta.astype(x.dtype), jnp.zeros((), x.dtype))


class Set(SiteEdit):
  """The selected entries replaced by value (broadcast against the site value)."""
  value: jax.Array = None
  per_layer: bool = struct.field(pytree_node=False, default=False)

  def apply(self, x, selected, ctx):
    return jnp.where(selected, self._value(self.value, ctx, self.per_layer).astype(x.dtype), x)


class Scale(SiteEdit):
  """The selected entries multiplied by factor."""
  factor: jax.Array = struct.field(default_factory=lambda: jnp.ones(()))

  def apply(self, x, selected, ctx):
    return x * jnp.where(selected, jnp.asarray(self.factor).astype(x.dtype), jnp.ones((), x.dtype))


class Ablate(SiteEdit):
  """Zero-ablation, or mean-ablation when `mean` is given (broadcast against the site value,
  [L, ...] with per_layer; e.g. `interp.patching.site_mean` over a reference set)."""
  mean: Optional[jax.Array] = None
  per_layer: bool = struct.field(pytree_node=False, default=False)

  def apply(self, x, selected, ctx):
    fill = jnp.zeros((), x.dtype) if self.mean is None else self._value(self.mean, ctx, self.per_layer).astype(x.dtype)
    return jnp.where(selected, fill, x)


class Patch(SiteEdit):
  """Activation patching: the selected entries replaced by what a source run had there.

  source: the source run's tap of this site ([L, B, S, ...] for block sites, [B, S, ...]
  otherwise; `forward(..., taps=(site,))`), a prefill of S slots whose last slot is each row's
  last prompt token (left padding). A token of this call at position p relative to its own
  prompt end takes the source's slot S + p, so runs of different lengths or padding align by
  their prompt ends; tokens with no source slot (S + p outside [0, S), e.g. generated tokens)
  are left alone. attn.scores / attn.pattern also need the same key slots as the source.
  """
  source: jax.Array = None

  def apply(self, x, selected, ctx):
    src = self._value(self.source, ctx, self.site in BLOCK_SITES)
    t = sites.time_axis(self.site)
    s = src.shape[t]
    slot = s + ctx.relative                                                  # [B, T]
    valid = (slot >= 0) & (slot < s)
    idx = jnp.clip(slot, 0, s - 1)
    if LAYOUT[self.site] == "bhts":
      if src.shape[3] != x.shape[3]:
        raise ValueError(f"patching {self.site} needs the source's {src.shape[3]} key slots, this call has "
                         f"{x.shape[3]}; patch a prefill of the same length")
      got = jnp.take_along_axis(src, idx[:, None, :, None], axis=2)
      valid = valid[:, None, :, None]
    else:
      expand = tuple(range(2, src.ndim))
      got = jnp.take_along_axis(src, jnp.expand_dims(idx, expand), axis=1)
      valid = jnp.expand_dims(valid, expand)
    return jnp.where(selected & valid, got.astype(x.dtype), x)


class AddToResidual(Intervention):
  """Adds scale * vectors[layer] at resid_post (after each block): the steering-vector layout.

  vectors: [L, D] or [B, L, D] (per-example vectors, e.g. per-prompt ConVA edits); rows
  of layers that should stay untouched are zero. scale: [] or [B]. where: which tokens
  (`Where`; None = every position, pads included, of every call), e.g.
  `Where(span=(-2**30, 0), relative=True)` steers the prompt and no generated token.
  """
  ROW_FIELDS: ClassVar[dict[str, int]] = {"vectors": 2, "scale": 0}
  vectors: jax.Array
  scale: jax.Array = struct.field(default_factory=lambda: jnp.ones(()))
  where: Optional[Where] = None

  def edit_sites(self):
    return ("resid_post",)

  def delta(self, layer):
    """What is added after block `layer`: [D] or [B, 1, D], broadcastable against [B, T, D]."""
    v = self.vectors[..., layer, :]               # [D] or [B, D]
    if v.ndim == 2:
      v = v[:, None, :]
    s = jnp.asarray(self.scale)
    s = s[:, None, None] if s.ndim == 1 else s
    return s * v

  def edit(self, site, h, ctx):
    delta = self.delta(ctx.layer).astype(h.dtype)
    if self.where is not None:
      delta = jnp.where(self.where.mask(site, ctx, h.ndim), delta, jnp.zeros((), h.dtype))
    return h + delta
