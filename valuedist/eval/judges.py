"""Judges: text classifiers over a model's pooled hidden states (one forward of any model,
usually not the one being steered) plus a standardised linear probe (`fit_text_classifier`,
its feature standardisation folded into w and b, so it scores raw features)."""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from valuedist.model import transformer
from valuedist.model.config import ModelConfig
from valuedist.values.probes import LinearProbe, accuracy, fit_logistic, fit_logistic_batched

POOLINGS = ("mean", "last")


@functools.partial(jax.jit, static_argnames=("cfg", "layer", "how", "skip_first"))
def pool_hidden(params: dict, cfg: ModelConfig, tokens: jax.Array, mask: jax.Array,
                layer: Optional[int] = -1, how: str = "mean", skip_first: bool = False) -> jax.Array:
  """Pooled residual stream after block `layer` (negative counts from the end; None: all).

  tokens, mask: [B, T] (1 = token; left or right padding). how: 'mean' over real tokens or
  the 'last' real token. skip_first: leave each row's first real token out of the mean (an
  attention sink whose residual norm dwarfs the rest, BOS or not), unless it is the only one.
  Returns f32 [B, D], or [L, B, D] for layer=None. One forward, without the vocabulary
  projection."""
  if how not in POOLINGS:
    raise ValueError(f"pooling {how!r} is unknown; use one of {', '.join(POOLINGS)}")
  if layer is not None and not -cfg.n_layers <= layer < cfg.n_layers:
    raise ValueError(f"layer {layer} is out of range for a model with {cfg.n_layers} layers")
  last = layer is not None and layer % cfg.n_layers == cfg.n_layers - 1
  tap = "final" if last else "resid_post"     # the last block alone: skip the [L, ...] stack
  _, _, taps = transformer.forward(params, tokens, cfg, attention_mask=mask, taps=(tap,), logits=False)
  h = taps[tap] if last or layer is None else taps[tap][layer]
  h = h.astype(jnp.float32)                        # [B, T, D] or [L, B, T, D]
  m = mask.astype(jnp.float32)
  if skip_first:
    first = jax.nn.one_hot(jnp.argmax(m, axis=1), m.shape[1]) * (m.sum(1, keepdims=True) > 1)
    m = m * (1.0 - first)
  if how == "mean":
    return (h * m[..., None]).sum(-2) / jnp.maximum(m.sum(-1), 1.0)[..., None]
  idx = m.shape[1] - 1 - jnp.argmax(m[:, ::-1], axis=1)
  return h[..., jnp.arange(m.shape[0]), idx, :]


def fit_text_classifier(features, labels, *, l2: float = 1e-2, max_iter: int = 500, tol: float = 1e-6,
                        name: Optional[str] = None, layer=None) -> LinearProbe:
  """Judge on pooled features [N, D] with labels [N] in {0, 1}: standardised logistic
  regression with the standardisation folded into w [D], b [], so it scores raw features."""
  return fit_logistic(features, labels, l2=l2, max_iter=max_iter, tol=tol, standardize=True,
                      name=name, layer=layer)


def layer_accuracies(features, labels, train, test, *, l2: float = 1e-2, max_iter: int = 500) -> np.ndarray:
  """Held-out accuracy of a text classifier fitted on each layer's features: features
  [L, N, D], labels [N], train/test row indices -> [L] (one batched fit for all layers)."""
  x = jnp.asarray(features)
  y = jnp.asarray(labels)
  probe = fit_logistic_batched(x[:, train], jnp.broadcast_to(y[train], (x.shape[0], len(train))), l2=l2,
                               max_iter=max_iter, standardize=True)
  return np.asarray(jax.vmap(accuracy, in_axes=(0, 0, None))(probe, x[:, test], y[test]))


def fit_one_vs_rest(features, labels, n_classes: int, *, l2: float = 1e-2, max_iter: int = 500) -> LinearProbe:
  """C standardised one-vs-rest text classifiers on features [N, D] with labels [N] in
  0..C-1: w [C, D], b [C]. `predict` takes the class with the highest logit."""
  labels = np.asarray(labels)
  fits = [fit_text_classifier(features, (labels == k).astype(np.int32), l2=l2, max_iter=max_iter)
          for k in range(n_classes)]
  return LinearProbe(jnp.stack([f.w for f in fits]), jnp.stack([f.b for f in fits]))


def predict(probe: LinearProbe, features) -> np.ndarray:
  """[N] class of each row of features [N, D] under a one-vs-rest probe (w [C, D])."""
  return np.asarray(jnp.argmax(probe.logit(jnp.asarray(features)), -1))


def class_accuracy(predicted, labels, names) -> dict:
  """{'overall', 'per_class': {name: recall}, 'n', 'n_per_class', 'chance'}: accuracy of
  predicted class ids against labels [N], with the majority-class rate as chance."""
  predicted, labels = np.asarray(predicted), np.asarray(labels)
  counts = np.bincount(labels, minlength=len(names))
  return {"overall": round(float((predicted == labels).mean()), 4),
          "per_class": {n: round(float((predicted[labels == k] == k).mean()), 4) if counts[k] else None
                        for k, n in enumerate(names)},
          "n": int(len(labels)), "n_per_class": {n: int(counts[k]) for k, n in enumerate(names)},
          "chance": round(float(counts.max() / len(labels)), 4)}
