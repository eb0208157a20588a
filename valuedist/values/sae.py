"""Sparse autoencoders on the residual stream: JumpReLU (Gemma Scope format) and TopK,
loading and saving, quality figures, value features, and steering interventions (training:
`values.sae_training`).

Shapes: D residual width, F latents. W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D],
threshold [F] (JumpReLU only).
  JumpReLU: a = relu(x W_enc + b_enc) * (x W_enc + b_enc > threshold)
  TopK:     a = the k largest of relu((x - b_dec) W_enc + b_enc), others 0
  decode:   x_hat = a W_dec + b_dec
"""
from __future__ import annotations

import functools
import hashlib
import io
import zipfile
from pathlib import Path
from typing import ClassVar, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from valuedist.model import edits, transformer
from valuedist.parallel import hosts

KINDS = ("jumprelu", "topk")
ARRAYS = ("W_enc", "b_enc", "W_dec", "b_dec", "threshold")


class SAE(struct.PyTreeNode):
  W_enc: jax.Array
  b_enc: jax.Array
  W_dec: jax.Array
  b_dec: jax.Array
  threshold: jax.Array
  kind: str = struct.field(pytree_node=False, default="jumprelu")
  k: int = struct.field(pytree_node=False, default=0)

  @property
  def width(self) -> int:
    return self.W_enc.shape[1]

  @property
  def d_model(self) -> int:
    return self.W_enc.shape[0]

  def pre(self, x: jax.Array) -> jax.Array:
    x = jnp.asarray(x, jnp.float32)
    if self.kind == "topk":
      x = x - self.b_dec
    return jnp.matmul(x, self.W_enc, precision="highest") + self.b_enc

  def encode(self, x: jax.Array) -> jax.Array:
    """x [..., D] -> latent activations [..., F]."""
    pre = self.pre(x)
    if self.kind == "jumprelu":
      return jax.nn.relu(pre) * (pre > self.threshold)
    acts = jax.nn.relu(pre)
    kth = jax.lax.top_k(acts, self.k)[0][..., -1:]          # the k-th largest (ties may keep a few more)
    return jnp.where(acts >= kth, acts, 0.0)

  def decode(self, a: jax.Array) -> jax.Array:
    return jnp.matmul(a, self.W_dec, precision="highest") + self.b_dec

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.decode(self.encode(x))


def check_width(sae: SAE, d_model: int, layer: Optional[int] = None) -> SAE:
  if sae.d_model != d_model:
    where = f" layer {layer}" if layer is not None else ""
    raise ValueError(f"the SAE reads width {sae.d_model} but the model's{where} residual stream has width "
                     f"{d_model}; use an SAE trained on this model")
  return sae


def init_topk(key: jax.Array, d_model: int, width: int, k: int, b_dec: Optional[jax.Array] = None) -> SAE:
  """TopK SAE with unit-norm decoder rows and the encoder tied to the decoder at init."""
  w_dec = jax.random.normal(key, (width, d_model))
  w_dec = w_dec / jnp.linalg.norm(w_dec, axis=-1, keepdims=True)
  b_dec = jnp.zeros(d_model) if b_dec is None else jnp.asarray(b_dec, jnp.float32)
  return SAE(w_dec.T, jnp.zeros(width), w_dec, b_dec, jnp.zeros(width), kind="topk", k=int(k))


# ----------------------------------------------------------------------------- files

def load_sae(path, kind: Optional[str] = None, k: int = 0) -> SAE:
  """An SAE from a .npz or .safetensors file with W_enc, W_dec, b_enc, b_dec (and threshold
  for JumpReLU, as Gemma Scope's params.npz). kind: 'jumprelu' or 'topk' (needs k, or a 'k'
  entry in the file); by default the file's 'kind' entry, else 'topk' when it has a 'k' entry,
  else 'jumprelu' when a threshold is present."""
  path = Path(path)
  if not path.is_file():
    raise ValueError(f"SAE file {str(path)!r} does not exist; pass a .npz or .safetensors file")
  if path.suffix == ".safetensors":
    from safetensors.numpy import load_file
    arrays = load_file(str(path))
  else:
    with np.load(path) as f:
      arrays = {n: f[n] for n in f.files}
  missing = [n for n in ARRAYS[:4] if n not in arrays]
  if missing:
    raise ValueError(f"{path}: no {', '.join(missing)} arrays; an SAE file needs {', '.join(ARRAYS[:4])}")
  stored = str(arrays["kind"]) if "kind" in arrays else "topk" if "k" in arrays else None   # written by save_sae
  kind = kind or stored or ("jumprelu" if "threshold" in arrays else "topk")
  if kind not in KINDS:
    raise ValueError(f"SAE kind {kind!r} is unknown; use one of {', '.join(KINDS)}")
  k = int(k or np.asarray(arrays.get("k", 0)))
  if kind == "jumprelu" and "threshold" not in arrays:
    raise ValueError(f"{path}: a JumpReLU SAE needs a 'threshold' array")
  if kind == "topk" and k <= 0:
    raise ValueError(f"{path}: a TopK SAE needs k > 0 (pass k or store a 'k' entry)")
  d, f = arrays["W_enc"].shape
  if arrays["W_dec"].shape != (f, d) or arrays["b_enc"].shape != (f,) or arrays["b_dec"].shape != (d,):
    raise ValueError(f"{path}: array shapes disagree (W_enc {arrays['W_enc'].shape}, W_dec {arrays['W_dec'].shape}, "
                     f"b_enc {arrays['b_enc'].shape}, b_dec {arrays['b_dec'].shape})")
  thr = arrays.get("threshold", np.zeros(f))
  return SAE(*(jnp.asarray(a, jnp.float32) for a in (arrays["W_enc"], arrays["b_enc"], arrays["W_dec"],
                                                      arrays["b_dec"], thr)), kind=kind, k=k)


def save_sae(path, sae: SAE, fingerprint: str = "") -> None:
  """.npz in the Gemma Scope layout plus 'kind' ('k' for TopK, and 'fingerprint' when given:
  what the SAE was trained on, see `saved_fingerprint`), written whole or not at all, by
  process 0 only."""
  arrays = {n: np.asarray(getattr(sae, n)) for n in ARRAYS}
  arrays["kind"] = np.asarray(sae.kind)
  if sae.kind == "topk":
    arrays["k"] = np.asarray(sae.k)
  if fingerprint:
    arrays["fingerprint"] = np.asarray(fingerprint)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  hosts.atomic_write(path, buf.getvalue())


def saved_fingerprint(path) -> Optional[str]:
  """The fingerprint stored by `save_sae` in file `path`; None when there is no readable file or no fingerprint."""
  try:
    with np.load(path) as f:
      return str(f["fingerprint"]) if "fingerprint" in f.files else None
  except (OSError, ValueError, KeyError, zipfile.BadZipFile):
    return None


def sae_digest(sae: SAE) -> str:
  """sha256 hex of an SAE's kind, k and arrays (dtype, shape, bytes)."""
  h = hashlib.sha256(f"{sae.kind}|{sae.k}".encode())
  for n in ARRAYS:
    update_hash(h, np.asarray(getattr(sae, n)))
  return h.hexdigest()


def update_hash(h, a: np.ndarray) -> None:
  a = np.ascontiguousarray(a)
  h.update(f"|{a.dtype}|{a.shape}|".encode())
  h.update(a.reshape(-1).view(np.uint8))


def quality(sae: SAE, acts: np.ndarray, batch: int = 4096) -> dict:
  """Reconstruction MSE (per row, summed over D), explained variance, mean L0 and the share
  of latents that never fire on acts [N, D]."""
  acts = np.asarray(acts, np.float32)
  sse, l0, fired = 0.0, 0.0, np.zeros(sae.width, bool)
  for s in range(0, len(acts), batch):
    x = jnp.asarray(acts[s:s + batch])
    a = sae.encode(x)
    sse += float(jnp.sum((sae.decode(a) - x) ** 2))
    l0 += float(jnp.sum(a > 0))
    fired |= np.asarray((a > 0).any(0))
  total = float(((acts - acts.mean(0)) ** 2).sum())
  return {"mse": sse / len(acts), "explained_variance": 1 - sse / total, "l0": l0 / len(acts),
          "dead_share": float(1 - fired.mean()), "width": sae.width, "rows": len(acts)}


def active_means(sae: SAE, acts: np.ndarray, batch: int = 4096) -> np.ndarray:
  """[F] each latent's mean activation over the rows of acts [N, D] where it fires (0 if never)."""
  total, count = np.zeros(sae.width), np.zeros(sae.width)
  for s in range(0, len(acts), batch):
    a = np.asarray(sae.encode(jnp.asarray(acts[s:s + batch])))
    total += a.sum(0)
    count += (a > 0).sum(0)
  return total / np.maximum(count, 1)


# ----------------------------------------------------------------------------- features, steering

def standardised_difference(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """Latent activations a, b [N, F] of the two sides -> [F] (mean a - mean b) / pooled sd."""
  return (a.mean(0) - b.mean(0)) / (np.sqrt(0.5 * (a.var(0) + b.var(0))) + 1e-6)


def value_features(sae: SAE, pos: np.ndarray, neg: np.ndarray, top: int = 5) -> list[tuple[int, float]]:
  """Latents whose activation differs most between positive and negative sides: pos, neg
  [N, D] -> [(latent, standardised mean difference)] best first. Reads only the rows given:
  pass the training pairs, and check the choice on others with `held_out_effect`."""
  score = standardised_difference(np.asarray(sae.encode(jnp.asarray(pos))), np.asarray(sae.encode(jnp.asarray(neg))))
  order = np.argsort(-score)[:top]
  return [(int(i), float(score[i])) for i in order]


def held_out_effect(sae: SAE, latents, pos: np.ndarray, neg: np.ndarray, *, seed: int = 0,
                    n_null: int = 1000) -> list[dict]:
  """How chosen latents separate pairs they were not chosen on: pos, neg [N, D] (row i of both
  is pair i) -> per latent {'latent', 'held_out_score' (standardised difference), 'held_out_accuracy'
  (share of pairs with a(pos) > a(neg), ties 1/2; chance 0.5), 'p' (one-sided sign-flip
  permutation p of the mean paired difference > 0), 'pairs'}; None figures without pairs."""
  if len(pos) == 0:
    return [dict(latent=int(f), held_out_score=None, held_out_accuracy=None, chance=0.5, p=None, pairs=0)
            for f in latents]
  idx = np.asarray(latents, int)
  a = np.asarray(sae.encode(jnp.asarray(pos)))[:, idx]
  b = np.asarray(sae.encode(jnp.asarray(neg)))[:, idx]
  d = a - b                                                               # [N, K]
  score = standardised_difference(a, b)
  acc = ((d > 0) + 0.5 * (d == 0)).mean(0)
  signs = np.random.default_rng(seed).choice(np.array([-1.0, 1.0]), size=(n_null, len(d)))
  null = signs @ d / len(d)                                               # [n_null, K]
  p = (1 + (null >= d.mean(0) - 1e-12).sum(0)) / (1 + n_null)
  return [dict(latent=int(f), held_out_score=float(score[k]), held_out_accuracy=float(acc[k]), chance=0.5,
               p=float(p[k]), pairs=int(len(d))) for k, f in enumerate(idx)]


def steering_vectors(sae: SAE, latent: int, layer: int, n_layers: int, direction=None) -> jax.Array:
  """[L, D]: the latent's decoder row (or a given [D] `direction`) at `layer`, zero elsewhere
  (for AddToResidual)."""
  d = sae.W_dec[latent] if direction is None else direction
  return jnp.zeros((n_layers, sae.d_model), jnp.float32).at[layer].set(d)


def unit_direction(sae: SAE, latent: int) -> jax.Array:
  """[D] the latent's decoder row scaled to unit norm (rows of a loaded SAE need not be unit)."""
  row = sae.W_dec[latent]
  return row / jnp.maximum(jnp.linalg.norm(row), 1e-12)


def _rows(x: jax.Array, shared_ndim: int, h: jax.Array) -> jax.Array:
  """A field of shared rank `shared_ndim` broadcastable against h [B, T, ...]: as given when
  shared, its per-row form [B, ...] with the positions' axes inserted after B."""
  x = jnp.asarray(x)
  if x.ndim == shared_ndim:
    return x
  return x.reshape(x.shape[:1] + (1,) * (h.ndim - 1 - shared_ndim) + x.shape[1:])


class ClampLatent(transformer.Intervention):
  """Sets one latent's activation to `value` at `layer`: h + (value - a_f) * direction, with
  direction = W_dec[f] by default (the exact clamp) or a given [D] vector (a control that moves
  the residual by the same per-position amount elsewhere), at the tokens `where` selects
  (`edits.Where`; None = every position of every call). latent, value and direction may be
  given per row ([B], [B], [B, D]), so clamps of different latents share a batch; the SAE and
  the layer are shared."""
  ROW_FIELDS: ClassVar[dict[str, int]] = {"latent": 0, "value": 0, "direction": 1}
  sae: SAE
  latent: jax.Array
  layer: jax.Array
  value: jax.Array
  direction: Optional[jax.Array] = None
  where: Optional[edits.Where] = None

  def edit_sites(self):
    return ("resid_post",)

  def edit(self, site, h, ctx):
    enc = self.sae.encode(h)                                     # [B, T, F]
    latent = jnp.asarray(self.latent)
    a = (jnp.take_along_axis(enc, latent.reshape((-1,) + (1,) * (enc.ndim - 1)), axis=-1)[..., 0] if latent.ndim
         else enc[..., latent])                                  # [B, T]
    d = self.sae.W_dec[latent] if self.direction is None else self.direction     # [D] or [B, D]
    edit = ((_rows(self.value, 0, a) - a)[..., None] * _rows(d, 1, h)).astype(h.dtype)
    if self.where is not None:
      edit = jnp.where(self.where.mask(site, ctx, h.ndim), edit, jnp.zeros((), h.dtype))
    return jnp.where(ctx.layer == self.layer, h + edit, h)


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def layer_activations(params: dict, tokens: jax.Array, mask: jax.Array, cfg, layer: int) -> jax.Array:
  """Residual stream after block `layer` at every position: tokens, mask [B, T] -> f32 [B, T, D]."""
  _, _, taps = transformer.forward(params, tokens, cfg, attention_mask=mask, taps=("resid_post",), logits=False)
  return taps["resid_post"][layer].astype(jnp.float32)
