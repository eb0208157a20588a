"""Steering interventions: jitted transforms of the residual stream (see `transformer.Intervention`).

AnchorEdit constructs a value distinction: it edits the last hidden representation so the
anchor-word gap J grows, at every prefill position and decode step. LogitBias is the
trivial competitor: a static bonus on positive anchor logits and malus on negative ones.
"""
from __future__ import annotations

from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
from flax import struct

from valuedist.model import layers, transformer
from valuedist.model.config import ModelConfig
from valuedist.values.anchors import Anchors
from valuedist.values.gap import side_stats

EDIT_MODES = ("step", "ascent", "target")
SITES = ("final", "normed")


class AnchorEdit(transformer.Intervention):
  """Edits h so that J(h) = gap(unembed(final_norm(h))) of one lexicon grows.

  site 'final' (default) edits the last block's output before the final norm; 'normed'
  edits after it, where J is linear in h, so any gradient edit there is a constant
  direction in logit space (a logit bias): kept as an option only.
  Modes (all coefficients traced, so a sweep compiles once):
    step:   h + alpha * |h| * g / |g|, g = dJ/dh
    ascent: `steps` rounds of delta += alpha * (dJ(h + delta) - 2 * lam * delta)
    target: no edit where J(h) >= margin; else the smallest s >= 0 with
            J(h + s * g/|g|) = margin, by Newton steps along g (s capped at max_scale * |h|)
  With `control` (a random unit vector, `values.controls`), each position's edit keeps the
  norm the method would give it at that state but points along `control`: the matched
  random-direction control of STUDY_PROTOCOL rule 7, through the same program.
  gate and control may be given per row ([B], [B, D]; a zero control row is the method's own
  edit, so edit and control rows share a batch); the lexicon and knobs are shared.
  """
  ROW_FIELDS: ClassVar[dict[str, int]] = {"gate": 0, "control": 1}
  norm_params: dict
  w_anchor: jax.Array          # [D, 1, 2, K]
  mask: jax.Array              # [1, 2, K]
  alpha: jax.Array = struct.field(default_factory=lambda: jnp.asarray(0.0))
  lam: jax.Array = struct.field(default_factory=lambda: jnp.asarray(0.0))
  steps: jax.Array = struct.field(default_factory=lambda: jnp.asarray(1))
  margin: jax.Array = struct.field(default_factory=lambda: jnp.asarray(0.0))
  max_scale: jax.Array = struct.field(default_factory=lambda: jnp.asarray(10.0))
  gate: Optional[jax.Array] = None      # [B] 1 = edit this row (None: every row), as other methods' gates
  control: Optional[jax.Array] = None   # [D] unit vector: the matched random-direction control (see below)
  cfg: ModelConfig = struct.field(pytree_node=False, default=None)
  mode: str = struct.field(pytree_node=False, default="target")
  site: str = struct.field(pytree_node=False, default="final")
  objective: str = struct.field(pytree_node=False, default="mean")   # "mean" or "lse"
  newton_iters: int = struct.field(pytree_node=False, default=8)

  @classmethod
  def create(cls, params: dict, cfg: ModelConfig, anchors: Anchors, lexicon: str, **kw) -> "AnchorEdit":
    if kw.get("mode", "target") not in EDIT_MODES:
      raise ValueError(f"edit mode {kw['mode']!r} is unknown; use one of {', '.join(EDIT_MODES)}")
    if kw.get("site", "final") not in SITES:
      raise ValueError(f"edit site {kw['site']!r} is unknown; use one of {', '.join(SITES)}")
    one = anchors.select(lexicon)
    w = transformer.unembed_kernel(params, cfg).astype(jnp.float32)[:, one.ids]
    traced = {k: jnp.asarray(kw.pop(k)) for k in ("alpha", "lam", "steps", "margin", "max_scale") if k in kw}
    return cls(params["final_norm"], w, one.mask, cfg=cfg, **traced, **kw)

  def objective_value(self, h: jax.Array, normed: bool = False) -> jax.Array:
    """J per position: h [..., D] -> [...]."""
    hn = h.astype(jnp.float32) if normed else layers.norm(self.norm_params, h.astype(jnp.float32), self.cfg)
    za = jnp.einsum("...d,dgsk->...gsk", hn, self.w_anchor)
    if self.cfg.final_softcap is not None:
      za = jnp.tanh(za / self.cfg.final_softcap) * self.cfg.final_softcap
    return side_stats(za, self.mask)[self.objective][..., 0]

  def _edit(self, h: jax.Array, normed: bool) -> jax.Array:
    dtype = h.dtype
    h = h.astype(jnp.float32)
    J = lambda x: self.objective_value(x, normed)
    grad = jax.grad(lambda x: J(x).sum())      # positions are independent: per-position gradients
    norm = lambda x: jnp.linalg.norm(x, axis=-1, keepdims=True)
    if self.mode == "step":
      g = grad(h)
      out = h + self.alpha * norm(h) * g / jnp.maximum(norm(g), 1e-12)
    elif self.mode == "ascent":
      body = lambda _, d: d + self.alpha * (grad(h + d) - 2 * self.lam * d)
      out = h + jax.lax.fori_loop(0, self.steps, body, jnp.zeros_like(h))
    else:
      u = grad(h)
      u = u / jnp.maximum(norm(u), 1e-12)
      s_max = self.max_scale * norm(h)[..., 0]

      def newton(_, s):
        x = h + s[..., None] * u
        val, slope = jax.jvp(J, (x,), (u,))
        s = s + (self.margin - val) / jnp.where(jnp.abs(slope) > 1e-12, slope, 1e-12)
        return jnp.clip(s, 0.0, s_max)
      s = jax.lax.fori_loop(0, self.newton_iters, newton, jnp.zeros(h.shape[:-1]))
      s = jnp.where(J(h) >= self.margin, 0.0, s)
      out = h + s[..., None] * u
    if self.control is not None:
      control = self.control.astype(jnp.float32)                   # [D] or [B, D]
      if control.ndim == 2:
        control = control.reshape(control.shape[:1] + (1,) * (h.ndim - 2) + control.shape[1:])
      out = jnp.where(jnp.any(control != 0, axis=-1, keepdims=True), h + norm(out - h) * control, out)
    if self.gate is not None:
      out = h + self.gate.astype(jnp.float32).reshape((-1,) + (1,) * (h.ndim - 1)) * (out - h)
    return out.astype(dtype)

  def edit_sites(self):
    return ("final" if self.site == "final" else "final_normed",)

  def edit(self, site, h, ctx):
    return self._edit(h, normed=site == "final_normed")


class LogitBias(transformer.Intervention):
  """Adds +beta to one lexicon's positive anchor logits and -beta to its negative ones.
  bias: [V] with +1 / -1 at anchor ids; beta: traced strength, [] or per row [B]."""
  ROW_FIELDS: ClassVar[dict[str, int]] = {"beta": 0}
  bias: jax.Array
  beta: jax.Array = struct.field(default_factory=lambda: jnp.asarray(0.0))

  @classmethod
  def create(cls, anchors: Anchors, lexicon: str, vocab_size: int, beta=0.0) -> "LogitBias":
    one = anchors.select(lexicon)
    sign = jnp.where(one.mask[0], jnp.asarray([[1.0], [-1.0]]), 0.0)
    bias = jnp.zeros((vocab_size,)).at[one.ids[0].reshape(-1)].add(sign.reshape(-1))
    return cls(bias, jnp.asarray(beta, jnp.float32))

  def edit_sites(self):
    return ("logits",)

  def edit(self, site, z, ctx):
    bias = jnp.pad(self.bias, (0, z.shape[-1] - self.bias.shape[0]))    # logits padded past the vocabulary
    beta = jnp.asarray(self.beta)
    return z + beta.reshape(beta.shape + (1,) * (z.ndim - beta.ndim)) * bias
