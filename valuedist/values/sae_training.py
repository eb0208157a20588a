"""Training a TopK sparse autoencoder with optax: resumable, with orbax checkpoints kept only
for the same fingerprint (data and settings), the same SAE whether interrupted or not.
Shapes: N activations, D residual width."""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax

from valuedist.parallel import hosts
from valuedist.values.sae import SAE, init_topk, update_hash


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
  update_hash(h, np.asarray(acts, np.float32))
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
  stale = not same or any(p.name.isdigit() and int(p.name) > steps for p in found)
  if stale and hosts.is_writer():          # one process cleans a shared folder; the others wait below
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
  hosts.barrier(f"sae checkpoints {fingerprint[:12]}")
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
      restored = mgr.restore(start, args=ocp.args.StandardRestore(_host({"sae": sae, "opt": opt_state})))
      sae, opt_state = restored["sae"], restored["opt"]
  bar = tqdm(total=steps, initial=start, desc="SAE training", disable=not progress)
  for s, x in batches(acts, batch, seed, start, steps):
    sae, opt_state, aux = train_step(sae, opt_state, jnp.asarray(x), opt)
    bar.update(1)
    if s % 50 == 0:
      bar.set_postfix(mse=f"{float(aux['mse']):.4g}", l0=f"{float(aux['l0']):.1f}")
    if mgr is not None and ((s + 1) % ckpt_every == 0 or s + 1 == steps):
      mgr.save(s + 1, args=ocp.args.StandardSave(_host({"sae": sae, "opt": opt_state})))
  bar.close()
  if mgr is not None:
    mgr.wait_until_finished()
    mgr.close()
  return sae


def _host(state):
  """Training state as host arrays: every process trains the same SAE on its own device, and
  orbax saves host arrays once (process 0) where it refuses process-local device arrays."""
  return jax.tree.map(np.asarray, state)
