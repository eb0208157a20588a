"""Linear probes on hidden states.

A probe is w.h + b on features h [..., D]. `fit_logistic` trains one with L2-regularised
logistic regression by L-BFGS (jitted, f32); `fit_logistic_heads` trains H probes sharing
one x (one per value), and `fit_logistic_batched` trains G probes on G data sets at once
(one per layer, or per layer and value), with vmap. With concrete inputs the fits check
their data first; under an outer jit/vmap (traced inputs) only shapes are checked.

Judges built on these probes (pooled hidden states of a model + a standardised probe) are in
`valuedist.eval.judges`.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct


class LinearProbe(struct.PyTreeNode):
  """logit(h) = h.w + b. w: [D] (b: []) or [C, D] (b: [C]), f32.

  steps, grad_norm: the L-BFGS iterations used and the final gradient norm ([] or [C]),
  None for a probe built by hand. l2, name and layer are static metadata.
  """
  w: jax.Array
  b: jax.Array
  steps: Optional[jax.Array] = None
  grad_norm: Optional[jax.Array] = None
  l2: float = struct.field(pytree_node=False, default=0.0)
  name: Optional[str] = struct.field(pytree_node=False, default=None)
  layer: Optional[int | tuple] = struct.field(pytree_node=False, default=None)

  def logit(self, h: jax.Array) -> jax.Array:
    """h [..., D] -> [...] (w [D]) or [..., C] (w [C, D]: every probe on every h)."""
    return jnp.matmul(jnp.asarray(h, jnp.float32), self.w.T, precision="highest") + self.b

  def prob(self, h: jax.Array) -> jax.Array:
    """P(y = 1 | h), shaped like `logit(h)`."""
    return jax.nn.sigmoid(self.logit(h))

  def direction(self) -> jax.Array:
    """w scaled to unit norm along its last axis: the probe's value direction(s)."""
    return self.w / jnp.linalg.norm(self.w, axis=-1, keepdims=True)


def accuracy(probe: LinearProbe, x: jax.Array, y: jax.Array) -> jax.Array:
  """Share of rows with (logit > 0) == y. x [N, D], y [N] -> []; heads: y [N, C] -> [C].
  Pure, so `jax.vmap(accuracy)(probes, x[G, N, D], y[G, N])` scores batched fits."""
  pred = probe.logit(x) > 0
  return (pred == jnp.asarray(y).astype(bool)).mean(0)


def split_train_test(n: int, test_frac: float = 0.3, seed: int = 0, *, labels=None):
  """Deterministic shuffled split of range(n) -> (train_idx, test_idx), sorted int arrays.
  With `labels` [n], every class is split in the same proportion (stratified)."""
  if n < 2:
    raise ValueError(f"need at least 2 examples to split, got {n}")
  if not 0.0 < test_frac < 1.0:
    raise ValueError(f"test_frac must be in (0, 1), got {test_frac}")
  if labels is not None and len(labels) != n:
    raise ValueError(f"labels has {len(labels)} entries for n={n}")
  rng = np.random.default_rng(seed)
  groups = [np.arange(n)] if labels is None else [np.flatnonzero(np.asarray(labels) == c)
                                                  for c in np.unique(np.asarray(labels))]
  test = []
  for g in groups:
    k = min(max(int(round(len(g) * test_frac)), 1), len(g) - 1) if len(g) > 1 else 0
    test.append(rng.permutation(g)[:k])
  test = np.sort(np.concatenate(test)).astype(np.int64)
  return np.setdiff1d(np.arange(n), test), test


# ----------------------------------------------------------------------------- fitting

def _solve(x, y, *, l2, max_iter, tol, standardize):
  """One binary problem: x [N, D], y [N] -> (w [D], b [], steps [], grad_norm [])."""
  x, y = x.astype(jnp.float32), y.astype(jnp.float32)
  if standardize:
    mu, sd = x.mean(0), x.std(0)
    sd = jnp.where(sd > 1e-6 * jnp.maximum(jnp.abs(mu), 1.0), sd, 1.0)   # constant columns stay 0
    x = (x - mu) / sd

  def loss(p):
    w, b = p
    z = jnp.dot(x, w, precision="highest") + b
    return jnp.mean(jax.nn.softplus(z) - y * z) + 0.5 * l2 * jnp.dot(w, w)

  opt = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(loss)

  def step(carry):
    p, s = carry
    v, g = value_and_grad(p, state=s)
    u, s = opt.update(g, s, p, value=v, grad=g, value_fn=loss)
    return optax.apply_updates(p, u), s

  def running(carry):
    k = optax.tree.get(carry[1], "count")
    return (k == 0) | ((k < max_iter) & (optax.tree.norm(optax.tree.get(carry[1], "grad")) >= tol))

  p0 = (jnp.zeros(x.shape[-1], jnp.float32), jnp.zeros((), jnp.float32))
  (w, b), s = jax.lax.while_loop(running, step, (p0, opt.init(p0)))
  if standardize:                       # w.(x - mu)/sd + b  ==  (w/sd).x + (b - (w/sd).mu)
    w = w / sd
    b = b - jnp.dot(w, mu, precision="highest")
  return w, b, optax.tree.get(s, "count"), optax.tree.norm(optax.tree.get(s, "grad"))


@functools.partial(jax.jit, static_argnames=("layout", "standardize"))
def _fit(x, y, l2, max_iter, tol, *, layout: str, standardize: bool):
  solve = functools.partial(_solve, l2=l2, max_iter=max_iter, tol=tol, standardize=standardize)
  if layout == "heads":
    return jax.vmap(solve, in_axes=(None, 1))(x, y)
  if layout == "batched":
    return jax.vmap(solve)(x, y)
  return solve(x, y)


def _check(x, y_rows) -> None:
  """x [..., N, D]; y_rows [P, N]: the labels of every problem. One-line ValueErrors."""
  if x.ndim < 2 or x.shape[-2] == 0 or x.shape[-1] == 0 or y_rows.size == 0:
    raise ValueError(f"empty or malformed data: x has shape {tuple(x.shape)}, expected [N, D] with N, D > 0")
  if y_rows.shape[-1] != x.shape[-2]:
    raise ValueError(f"x has {x.shape[-2]} rows but y has {y_rows.shape[-1]} labels")
  if any(isinstance(a, jax.core.Tracer) for a in (x, y_rows)):
    return
  x, y_rows = np.asarray(x), np.asarray(y_rows)
  bad = int((~np.isfinite(x)).sum())
  if bad:
    raise ValueError(f"x holds {bad} non-finite values (NaN or inf)")
  if not np.isin(y_rows, (0, 1)).all():
    raise ValueError(f"y must hold only 0 and 1, got values {np.unique(y_rows)[:5].tolist()}")
  single = np.flatnonzero(y_rows.min(-1) == y_rows.max(-1))
  if single.size:
    where = "" if len(y_rows) == 1 else f" in problem {int(single[0])} ({single.size} of {len(y_rows)})"
    raise ValueError(f"y has a single class ({int(y_rows[single[0], 0])}){where}: a probe needs both 0 and 1")


def _probe(out, l2, **meta) -> LinearProbe:
  w, b, steps, gnorm = out
  return LinearProbe(w, b, steps, gnorm, l2=float(l2), **meta)


def fit_logistic(x, y, *, l2: float = 1e-3, max_iter: int = 500, tol: float = 1e-6,
                 standardize: bool = False, name: Optional[str] = None, layer=None) -> LinearProbe:
  """L2-regularised logistic regression, x [N, D], y [N] in {0, 1} -> probe with w [D], b [].

  Minimises mean BCE + l2/2 |w|^2 (bias unpenalised) by L-BFGS until |grad| < tol or
  max_iter iterations. standardize: fit on z-scored columns (so l2 acts on them), then fold
  the scaling into w, b so the probe applies to raw x."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.ndim != 2 or y.ndim != 1:
    raise ValueError(f"need x [N, D] and y [N], got shapes {tuple(x.shape)} and {tuple(y.shape)} "
                     "(fit_logistic_heads takes y [N, H], fit_logistic_batched x [G, N, D])")
  _check(x, y[None])
  return _probe(_fit(x, y, l2, max_iter, tol, layout="single", standardize=standardize), l2,
                name=name, layer=layer)


def fit_logistic_heads(x, y, *, l2: float = 1e-3, max_iter: int = 500, tol: float = 1e-6,
                       standardize: bool = False, name=None, layer=None) -> LinearProbe:
  """H independent binary probes on shared features: x [N, D], y [N, H] -> w [H, D], b [H]."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.ndim != 2 or y.ndim != 2:
    raise ValueError(f"need x [N, D] and y [N, H], got shapes {tuple(x.shape)} and {tuple(y.shape)}")
  _check(x, y.T)
  return _probe(_fit(x, y, l2, max_iter, tol, layout="heads", standardize=standardize), l2,
                name=name, layer=layer)


def fit_logistic_batched(x, y, *, l2: float = 1e-3, max_iter: int = 500, tol: float = 1e-6,
                         standardize: bool = False, name=None, layer=None) -> LinearProbe:
  """G independent probes on G data sets (e.g. one per layer): x [G, N, D], y [G, N]
  -> w [G, D], b [G]. Each equals `fit_logistic(x[g], y[g])`."""
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.ndim != 3 or y.ndim != 2 or x.shape[0] != y.shape[0]:
    raise ValueError(f"need x [G, N, D] and y [G, N], got shapes {tuple(x.shape)} and {tuple(y.shape)}")
  _check(x, y)
  return _probe(_fit(x, y, l2, max_iter, tol, layout="batched", standardize=standardize), l2,
                name=name, layer=layer)
