"""Sparse autoencoders on the residual stream: JumpReLU (Gemma Scope format) and TopK,
loading, training with optax (resumable, orbax checkpoints kept only for the same
fingerprint), quality figures, value features, and steering interventions.

Shapes: D residual width, F latents. W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D],
threshold [F] (JumpReLU only).
  JumpReLU: a = relu(x W_enc + b_enc) * (x W_enc + b_enc > threshold)
  TopK:     a = the k largest of relu((x - b_dec) W_enc + b_enc), others 0
  decode:   x_hat = a W_dec + b_dec
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from valuedist.model import transformer

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
  what the SAE was trained on, see `saved_fingerprint`), written whole or not at all."""
  arrays = {n: np.asarray(getattr(sae, n)) for n in ARRAYS}
  arrays["kind"] = np.asarray(sae.kind)
  if sae.kind == "topk":
    arrays["k"] = np.asarray(sae.k)
  if fingerprint:
    arrays["fingerprint"] = np.asarray(fingerprint)
  path = Path(path)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name)
  with os.fdopen(fd, "wb") as f:
    np.savez(f, **arrays)
  os.chmod(tmp, 0o644)
  os.replace(tmp, path)


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
    _update(h, np.asarray(getattr(sae, n)))
  return h.hexdigest()


def _update(h, a: np.ndarray) -> None:
  a = np.ascontiguousarray(a)
  h.update(f"|{a.dtype}|{a.shape}|".encode())
  h.update(a.reshape(-1).view(np.uint8))


# ----------------------------------------------------------------------------- training

def loss_fn(sae: SAE, x: jax.Array) -> tuple[jax.Array, dict]:
  a = sae.encode(x)
  err = sae.decode(a) - x
  mse = jnp.mean(jnp.sum(err ** 2, -1))
  return mse, {"mse": mse, "l0": jnp.mean(jnp.sum(a > 0, -1))}


def _normalise_decoder(sae: SAE) -> SAE:
  return sae.replace(W_dec=sae.W_dec / jnp.maximum(jnp.linalg.norm(sae.W_dec, axis=-1, keepdims=True), 1e-8))


@functools.partial(jax.jit, static_argnames="opt")
def train_step(sae: SAE, opt_state, x: jax.Array, opt: optax.GradientTransformation):
  """One Adam step on a batch x [N, D]; decoder rows renormalised to unit norm after it."""
  (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(sae, x)
  grads = grads.replace(threshold=jnp.zeros_like(grads.threshold))
  updates, opt_state = opt.update(grads, opt_state, sae)
  return _normalise_decoder(optax.apply_updates(sae, updates)), opt_state, aux


def batches(acts: np.ndarray, batch: int, seed: int, start_step: int, steps: int) -> Iterator[tuple[int, np.ndarray]]:
  """(step, rows [batch, D]) for steps start_step..steps-1; step s's batch depends only on (seed, s)."""
  for s in range(start_step, steps):
    idx = np.random.default_rng([seed, s]).integers(0, len(acts), batch)
    yield s, acts[idx]


def train_fingerprint(acts: np.ndarray, *, width: int, k: int, batch: int, lr: float, seed: int) -> str:
  """sha256 hex of what a training run's checkpoints depend on: activations [N, D] (bytes) and
  the knobs of its trajectory. Not `steps`: step s of a longer run equals step s of a shorter one."""
  h = hashlib.sha256(f"topk|{width}|{k}|{batch}|{lr!r}|{seed}".encode())
  _update(h, np.asarray(acts, np.float32))
  return h.hexdigest()


def checkpoint_manager(ckpt_dir, fingerprint: str, steps: int, max_to_keep: int = 2):
  """An orbax CheckpointManager on ckpt_dir that only holds checkpoints of `fingerprint` at
  step <= steps: step folders of another fingerprint (named in ckpt_dir/fingerprint.txt),
  or beyond `steps`, are removed first, so they are never resumed. Other files are left."""
  import orbax.checkpoint as ocp
  d = Path(ckpt_dir).absolute()
  stamp = d / "fingerprint.txt"
  found = [p for p in d.iterdir() if p.name.split(".")[0].isdigit()] if d.is_dir() else []
  same = stamp.is_file() and stamp.read_text().strip() == fingerprint
  if not same or any(p.name.isdigit() and int(p.name) > steps for p in found):
    for p in found:
      if p.is_dir():
        shutil.rmtree(p)
      else:
        p.unlink()
    d.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".fingerprint")
    with os.fdopen(fd, "w") as f:
      f.write(fingerprint + "\n")
    os.replace(tmp, stamp)
  return ocp.CheckpointManager(d, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep))


def train(acts: np.ndarray, *, width: int, k: int, steps: int, batch: int = 1024, lr: float = 1e-3,
          seed: int = 0, ckpt_dir=None, ckpt_every: int = 200, progress: bool = True) -> SAE:
  """Trains a TopK SAE on activations [N, D] (f32). With ckpt_dir, an orbax checkpoint of
  (sae, optimiser state, step) is written every ckpt_every steps and the run resumes from the
  latest one of the same `train_fingerprint` (others are removed: another corpus, layer,
  width... trains from scratch); the result is the same as an uninterrupted run."""
  import orbax.checkpoint as ocp
  from tqdm.auto import tqdm
  acts = np.asarray(acts, np.float32)
  if acts.ndim != 2 or len(acts) == 0:
    raise ValueError(f"need activations [N, D] with N > 0, got shape {acts.shape}")
  if not 0 < k <= width:
    raise ValueError(f"k={k} must be in 1..width ({width})")
  sae = init_topk(jax.random.PRNGKey(seed), acts.shape[1], width, k, b_dec=np.median(acts, 0))
  opt = optax.adam(lr)
  opt_state = opt.init(sae)
  start = 0
  mgr = None
  if ckpt_dir is not None:
    fp = train_fingerprint(acts, width=width, k=k, batch=batch, lr=lr, seed=seed)
    mgr = checkpoint_manager(ckpt_dir, fp, steps)
    if mgr.latest_step() is not None:
      start = mgr.latest_step()
      restored = mgr.restore(start, args=ocp.args.StandardRestore({"sae": sae, "opt": opt_state}))
      sae, opt_state = restored["sae"], restored["opt"]
  bar = tqdm(total=steps, initial=start, desc="SAE training", disable=not progress)
  for s, x in batches(acts, batch, seed, start, steps):
    sae, opt_state, aux = train_step(sae, opt_state, jnp.asarray(x), opt)
    bar.update(1)
    if s % 50 == 0:
      bar.set_postfix(mse=f"{float(aux['mse']):.4g}", l0=f"{float(aux['l0']):.1f}")
    if mgr is not None and ((s + 1) % ckpt_every == 0 or s + 1 == steps):
      mgr.save(s + 1, args=ocp.args.StandardSave({"sae": sae, "opt": opt_state}))
  bar.close()
  if mgr is not None:
    mgr.wait_until_finished()
    mgr.close()
  return sae


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
  (for AddToResidual / AddAtPositions)."""
  d = sae.W_dec[latent] if direction is None else direction
  return jnp.zeros((n_layers, sae.d_model), jnp.float32).at[layer].set(d)


def unit_direction(sae: SAE, latent: int) -> jax.Array:
  """[D] the latent's decoder row scaled to unit norm (rows of a loaded SAE need not be unit)."""
  row = sae.W_dec[latent]
  return row / jnp.maximum(jnp.linalg.norm(row), 1e-12)


def _at(where: jax.Array, h: jax.Array) -> jax.Array:
  """A position mask [] or [B, T] (1 = edit) broadcastable against h [B, T, D]."""
  w = jnp.asarray(where, jnp.float32)
  return w[..., None] if w.ndim == 2 else w


def _ones() -> jax.Array:
  return jnp.ones((), jnp.float32)


class AddAtPositions(transformer.AddToResidual):
  """`AddToResidual` (scale * vectors[layer], vectors [L, D]) at the positions where `where`
  ([] or [B, T] of the prefill, 1 = edit) is 1; decode steps use mask `decode` []:
  1 steers generated tokens too ('all'), 0 only the prompt ('prompt')."""
  where: jax.Array = struct.field(default_factory=_ones)
  decode: jax.Array = struct.field(default_factory=_ones)

  def residual(self, layer, h):
    return h + (_at(self.where, h) * self.delta(layer, h)).astype(h.dtype)

  def after_prefill(self, taps):
    return self.replace(where=self.decode)


class ClampLatent(transformer.Intervention):
  """Sets one latent's activation to `value` at `layer`: h + (value - a_f) * direction, with
  direction = W_dec[f] by default (the exact clamp) or a given [D] vector (a control that moves
  the residual by the same per-position amount elsewhere). Positions: `where` [] or [B, T] in
  the prefill, `decode` [] at decode steps, as in `AddAtPositions`."""
  sae: SAE
  latent: jax.Array
  layer: jax.Array
  value: jax.Array
  direction: Optional[jax.Array] = None
  where: jax.Array = struct.field(default_factory=_ones)
  decode: jax.Array = struct.field(default_factory=_ones)

  def residual(self, layer, h):
    a = self.sae.encode(h)[..., self.latent]
    d = self.sae.W_dec[self.latent] if self.direction is None else self.direction
    edit = _at(self.where, h) * (self.value - a)[..., None] * d
    return jnp.where(layer == self.layer, h + edit.astype(h.dtype), h)

  def after_prefill(self, taps):
    return self.replace(where=self.decode)


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def layer_activations(params: dict, tokens: jax.Array, mask: jax.Array, cfg, layer: int) -> jax.Array:
  """Residual stream after block `layer` at every position: tokens, mask [B, T] -> f32 [B, T, D]."""
  _, _, taps = transformer.forward(params, tokens, cfg, attention_mask=mask, taps=("residual",), logits=False)
  return taps["residual"][layer].astype(jnp.float32)
