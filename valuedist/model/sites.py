"""Named sites of the decoder, the context an edit sees there, and the Intervention base.

Every internal value the forward computes passes through one named site, where an
intervention may edit it and `forward(..., taps=...)` may return it (penzai-style: one
generic mechanism, selected by name). Shapes (B rows, T tokens of this call, S key slots,
D model width, H query heads, K KV heads, Dh head width, F MLP width, V vocabulary):

  embed          [B, T, D]     token (+ learned position) embedding, scaled
  per block (taps stacked to [L, ...]):
  resid_pre      [B, T, D]     the block's input
  attn.q         [B, T, H, Dh] queries after q-norm and RoPE (what the dot product sees)
  attn.k, attn.v [B, T, K, Dh] this call's keys (after k-norm and RoPE) and values, per KV head;
                               an edit here is what the KV cache stores
  attn.scores    [B, H, T, S]  pre-softmax scores, scaled, soft-capped, masked (NEG_INF at masked keys);
                               S = cache slots + T (S = T in a prefill into a fresh cache)
  attn.pattern   [B, H, T, S]  softmax of the scores: rows sum to 1, masked keys 0
  attn.z         [B, T, H, Dh] per-head attention output before the output projection
  attn.out       [B, T, D]     attention output added to the residual (after the post-norm, if any)
  resid_mid      [B, T, D]     residual after the attention add
  mlp.pre        [B, T, F]     MLP hidden pre-activation (the gate's, in gated MLPs)
  mlp.post       [B, T, F]     after the nonlinearity (act(gate) * up in gated MLPs)
  mlp.out        [B, T, D]     MLP output added to the residual (after the post-norm, if any)
  resid_post     [B, T, D]     the block's output
  final          [B, T, D]     the last block's output, before the final norm
  final_normed   [B, T, D]     after the final norm
  logits         [B, T, V]     f32 logits (after final soft-capping)

Every site exists for every family; family differences live inside the sites (Gemma's
post-norms are inside attn.out / mlp.out, GPT-2-style plain MLPs have no gate, learned
positions enter at embed). A tap name with RAW appended ('resid_post:raw') returns the
value before the edits at that site; the plain name returns it after them (what flows on).

Sites nobody taps or edits cost nothing: the forward asks `Hooks.wants` (static) first.
"""
from __future__ import annotations

import dataclasses
from typing import ClassVar, NamedTuple, Optional

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import PartitionSpec

from valuedist.model.partition import DATA

EMBED_SITES = ("embed",)
BLOCK_SITES = ("resid_pre", "attn.q", "attn.k", "attn.v", "attn.scores", "attn.pattern", "attn.z",
               "attn.out", "resid_mid", "mlp.pre", "mlp.post", "mlp.out", "resid_post")
FINAL_SITES = ("final", "final_normed", "logits")
SITES = EMBED_SITES + BLOCK_SITES + FINAL_SITES
RAW = ":raw"
TAP_NAMES = SITES + tuple(s + RAW for s in SITES)

# Axis layout of each site's value: b rows, t tokens, d/f/v a feature axis, h/k a head axis,
# e the head width, s key slots.
LAYOUT = {**{s: "btd" for s in ("embed", "resid_pre", "attn.out", "resid_mid", "mlp.out", "resid_post",
                                 "final", "final_normed")},
          "attn.q": "bthe", "attn.z": "bthe", "attn.k": "btke", "attn.v": "btke",
          "attn.scores": "bhts", "attn.pattern": "bhts", "mlp.pre": "btf", "mlp.post": "btf", "logits": "btv"}


def site_of(tap: str) -> str:
  """The site a tap name reads ('resid_post:raw' -> 'resid_post')."""
  return tap[:-len(RAW)] if tap.endswith(RAW) else tap


def check_sites(names, what: str = "taps") -> None:
  allowed = TAP_NAMES if what == "taps" else SITES
  unknown = sorted(set(names) - set(allowed))
  if unknown:
    raise ValueError(f"unknown {what} {unknown}; available: {', '.join(allowed)}")


def time_axis(site: str) -> int:
  return LAYOUT[site].index("t")


def head_axis(site: str) -> Optional[int]:
  """The head axis of a site's value in one call (H, or K at attn.k / attn.v), None if it has
  none; a block site's tap [L, ...] has it one later."""
  return next((i for i, a in enumerate(LAYOUT[site]) if a in "hk"), None)


class Context(NamedTuple):
  """What an edit knows besides the site's value.

  positions: [B, T] position of each token of this call; mask: [B, T] 1 = token, 0 = left pad;
  prompt_len: [B] tokens in each row's prompt (the position of the first generated token);
  step: [] 0 in a prefill or teacher-forced pass, k at the k-th decode step (the call that reads
  generated token k); layer: [] traced block index at block sites, None elsewhere.
  """
  positions: jax.Array
  mask: jax.Array
  prompt_len: jax.Array
  step: jax.Array
  layer: Optional[jax.Array] = None

  @property
  def relative(self) -> jax.Array:
    """[B, T] positions relative to the end of the prompt: -1 is the prompt's last token,
    0 the first generated one, whatever the left padding."""
    return self.positions - self.prompt_len[:, None]

  @staticmethod
  def create(positions: jax.Array, mask: jax.Array, step=0, prompt_len=None) -> "Context":
    """The context of a forward call. prompt_len defaults to the row's token count in a prefill
    (step 0) and to position - step + 1 at decode step `step`."""
    step = jnp.asarray(step, jnp.int32)
    if prompt_len is None:
      prefill = jnp.max(jnp.where(mask > 0, positions, -1), -1) + 1
      prompt_len = jnp.where(step > 0, positions[:, 0] - step + 1, prefill)
    return Context(positions, mask, jnp.asarray(prompt_len, jnp.int32), step)

  @staticmethod
  def simple(batch: int, length: int, layer=None) -> "Context":
    """A full (unpadded) prefill context, for calling an edit outside the forward."""
    pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    return Context.create(pos, jnp.ones((batch, length), jnp.int32))._replace(
        layer=None if layer is None else jnp.asarray(layer, jnp.int32))


class Intervention(struct.PyTreeNode):
  """Base of all interventions: a pytree whose arrays are traced and whose class (and static
  fields) are fixed per compiled program.

  `edit_sites()` names the sites it edits (static); `edit(site, x, ctx)` returns the edited
  value there, for every position of a prefill and at every decode step, inside the program.

  ROW_FIELDS {field: ndim of its shared form}: fields that may carry one value per batch row
  on a leading axis (they do when their ndim is larger), so a data-parallel program splits
  them with the rows (`row_specs`, `sampler.generate_data_parallel`) and a sweep concatenates
  rows of different conditions (`per_row`, `concat_rows`).
  """
  ROW_FIELDS: ClassVar[dict[str, int]] = {}

  def edit_sites(self) -> tuple[str, ...]:
    return ()

  def edit(self, site: str, x: jax.Array, ctx: Context) -> jax.Array:
    return x

  def row_specs(self) -> "Intervention":
    """This intervention with every array leaf replaced by its PartitionSpec in a program whose
    rows are split on `data`: P(DATA) where a ROW_FIELDS field carries rows, P() (the same
    on every shard) elsewhere; nested interventions answer for themselves."""
    return _row_specs(self)

  @property
  def prefill_taps(self) -> tuple[str, ...]:
    """Taps (names from TAP_NAMES) that `after_prefill` needs from the prefill pass."""
    return ()

  def after_prefill(self, taps: dict) -> "Intervention":
    """The intervention to apply at decode steps, given the prefill's `prefill_taps` at the
    prompt's last position (block taps [L, B, ...], others [B, ...]). Default: itself.
    An edit decided once per prompt (ConVA) computes it in prefill and returns a fixed one."""
    return self


class Compose(Intervention):
  """Applies several interventions in order at each site."""
  parts: tuple

  def edit_sites(self):
    return tuple(dict.fromkeys(s for p in self.parts for s in p.edit_sites()))

  def edit(self, site, x, ctx):
    for p in self.parts:
      if site in p.edit_sites():
        x = p.edit(site, x, ctx)
    return x

  @property
  def prefill_taps(self):
    return tuple(dict.fromkeys(n for p in self.parts for n in p.prefill_taps))

  def after_prefill(self, taps):
    return Compose(tuple(p.after_prefill(taps) for p in self.parts))


class Hooks:
  """What one forward call does at each site: the static sets of tapped and edited sites, the
  intervention, and the dict the taps of the current scope are written into."""

  def __init__(self, intervene: Optional[Intervention], taps: tuple[str, ...], tap_last: bool):
    check_sites(taps)
    self.iv = intervene
    self.edited = frozenset(intervene.edit_sites()) if intervene is not None else frozenset()
    check_sites(self.edited, "sites")
    self.taps = frozenset(taps)
    self.tap_last = tap_last
    self.rec: dict = {}

  def wants(self, site: str) -> bool:
    return site in self.edited or site in self.taps or site + RAW in self.taps

  def _keep(self, site, x):
    return jnp.take(x, -1, axis=time_axis(site)) if self.tap_last else x

  def __call__(self, site: str, x: jax.Array, ctx: Context) -> jax.Array:
    if site + RAW in self.taps:
      self.rec[site + RAW] = self._keep(site, x)
    if site in self.edited:
      x = self.iv.edit(site, x, ctx)
    if site in self.taps:
      self.rec[site] = self._keep(site, x)
    return x

  def fn(self, site: str, ctx: Context):
    """`lambda x: self(site, x, ctx)`, or None when the site is not wanted (nothing to compute)."""
    return (lambda x: self(site, x, ctx)) if self.wants(site) else None


def _row_fields(iv):
  """(name, value, per-row ndim or None) of each pytree field of an intervention-like struct
  (anything with ROW_FIELDS: interventions, and controls that resolve into one)."""
  for f in dataclasses.fields(iv):
    if f.metadata.get("pytree_node", True):
      yield f.name, getattr(iv, f.name), iv.ROW_FIELDS.get(f.name)


def _nested(v) -> bool:
  return hasattr(v, "ROW_FIELDS") or (isinstance(v, tuple) and bool(v) and all(hasattr(p, "ROW_FIELDS") for p in v))


def _row_specs(iv):
  """`Intervention.row_specs` of anything with ROW_FIELDS (nested ones such as `Where` too)."""
  def spec(name, v, shared_ndim):
    if _nested(v):
      return tuple(_row_specs(p) for p in v) if isinstance(v, tuple) else _row_specs(v)
    rows = shared_ndim is not None and getattr(v, "ndim", 0) > shared_ndim
    return jax.tree.map(lambda _: PartitionSpec(DATA) if rows else PartitionSpec(), v)
  return iv.replace(**{name: spec(name, v, nd) for name, v, nd in _row_fields(iv)})


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
      shapes = [jax.tree.map(jnp.shape, v) for v in vs]          # a shared field may be a pytree (an SAE)
      if any(type(v) is not type(vs[0]) or s != shapes[0] for v, s in zip(vs, shapes)):
        raise ValueError(f"{type(first).__name__}.{name} differs between the parts of one batch; it is not per row")
      return vs[0]
    x = jnp.concatenate(vs)
    if x.shape[0] > batch:
      raise ValueError(f"{x.shape[0]} rows do not fit a batch of {batch}")
    return jnp.concatenate([x, jnp.repeat(x[-1:], batch - x.shape[0], 0)])
  fields = list(_row_fields(first))
  return first.replace(**{name: one(name, [getattr(p, name) for p in parts], nd) for name, _, nd in fields})
