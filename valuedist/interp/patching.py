"""Run-with-cache, activation patching and attribution patching as jitted transforms.

A metric maps f32 logits [B, T, V] to one number per row [B] (e.g. `logit_difference`).
Clean and corrupted inputs are left-padded batches; patches align tokens by their position
relative to the end of each row's prompt (`edits.Patch`), so left padding never shifts them.
Attribution patching takes an elementwise difference and needs both runs in the same layout
(same T and padding).
"""
from __future__ import annotations

import functools
import itertools
from typing import Callable, Optional

import jax
import jax.numpy as jnp

from valuedist.model import transformer
from valuedist.model.config import ModelConfig
from valuedist.model.edits import Add, Patch, Where
from valuedist.model.sites import BLOCK_SITES, LAYOUT, Compose, check_sites, head_axis

Metric = Callable[[jax.Array], jax.Array]          # logits [B, T, V] -> [B]
GRID_AXES = ("layer", "position", "head")


def logit_difference(good: jax.Array, bad: jax.Array) -> Metric:
  """The metric logits[b, -1, good[b]] - logits[b, -1, bad[b]]: good, bad [B] token ids."""
  def metric(logits):
    last = logits[:, -1]
    rows = jnp.arange(last.shape[0])
    return last[rows, good] - last[rows, bad]
  return metric


@functools.partial(jax.jit, static_argnames=("cfg", "sites"))
def run_with_cache(params: dict, tokens: jax.Array, cfg: ModelConfig, sites: tuple[str, ...], *,
                   attention_mask: Optional[jax.Array] = None, intervene=None) -> tuple[jax.Array, dict]:
  """One forward returning (logits [B, T, V], {site: value}), block sites stacked [L, ...]."""
  logits, _, cache = transformer.forward(params, tokens, cfg, attention_mask=attention_mask, taps=sites,
                                         intervene=intervene)
  return logits, cache


def site_mean(cache: dict, site: str, mask: jax.Array) -> jax.Array:
  """The mean of a cached site over a batch's real tokens (for mean-ablation, `edits.Ablate`):
  [L, ...] for block sites ([...] the site's shape without rows and tokens)."""
  b = 1 if site in BLOCK_SITES else 0
  t = LAYOUT[site].index("t") + b
  x = cache[site].astype(jnp.float32)
  shape = [1] * x.ndim
  shape[b], shape[t] = mask.shape
  m = mask.astype(jnp.float32).reshape(shape)
  return (x * m).sum((b, t)) / jnp.maximum(m.sum((b, t)), 1.0)


def check_grid(site: str, by: tuple[str, ...]):
  check_sites((site,), "sites")
  if site not in BLOCK_SITES:
    raise ValueError(f"activation patching sweeps block sites ({', '.join(BLOCK_SITES)}), not {site}")
  bad = [a for a in by if a not in GRID_AXES] or (["head"] if "head" in by and head_axis(site) is None else [])
  if bad or "layer" not in by:
    raise ValueError(f"grid {by} does not fit site {site}: use 'layer' with any of 'position', 'head' "
                     f"(heads only at attn.q/k/v/z/scores/pattern)")


def activation_patching(params: dict, cfg: ModelConfig, metric: Metric, clean: tuple, corrupt: tuple, site: str,
                        by: tuple[str, ...] = ("layer", "position"), chunk: int = 8) -> jax.Array:
  """Activation patching (denoising): the corrupted run with one cell of `site` replaced by the
  clean run's value, for every cell of the grid `by` (layer x relative position [x head]).

  clean, corrupt: (tokens, mask) [B, T] each (swap them for noising). Returns the metric
  [*grid, B], grid axes in `by` order: layers L, positions T (relative -T .. -1, i.e. index j is
  the j-th slot of a T-token prompt), heads H (K at attn.k / attn.v). Cells run `chunk` at a
  time as one vmapped program (`jax.lax.map`)."""
  by = tuple(by)
  check_grid(site, by)
  _, cache = run_with_cache(params, clean[0], cfg, (site,), attention_mask=clean[1])
  t = corrupt[0].shape[1]
  ax = head_axis(site)
  sizes = {"layer": cfg.n_layers, "position": t, "head": 0 if ax is None else cache[site].shape[ax + 1]}
  cells = jnp.asarray(list(itertools.product(*(range(sizes[a]) for a in by))), jnp.int32)   # [N, len(by)]
  return _patch_grid(params, cfg, metric, corrupt[0], corrupt[1], cache[site], cells, site, by, chunk).reshape(
      tuple(sizes[a] for a in by) + (corrupt[0].shape[0],))


@functools.partial(jax.jit, static_argnames=("cfg", "metric", "site", "by", "chunk"))
def _patch_grid(params, cfg, metric, tokens, mask, source, cells, site, by, chunk):
  t = tokens.shape[1]

  def one(cell):
    idx = dict(zip(by, cell))
    where = Where(layers=jax.nn.one_hot(idx["layer"], cfg.n_layers),
                  positions=(idx["position"] - t)[None] if "position" in idx else None,
                  heads=jax.nn.one_hot(idx["head"], source.shape[head_axis(site) + 1]) if "head" in idx else None,
                  relative=True)
    logits, _, _ = transformer.forward(params, tokens, cfg, attention_mask=mask,
                                       intervene=Patch(site=site, where=where, source=source))
    return metric(logits)
  return jax.lax.map(one, cells, batch_size=chunk)


def attribution_patching(params: dict, cfg: ModelConfig, metric: Metric, clean: tuple, corrupt: tuple,
                         sites: tuple[str, ...]) -> tuple[dict, dict]:
  """Attribution patching: the first-order estimate of patching each entry of each site from
  the clean into the corrupted run, (clean - corrupted) * d metric / d site at the corrupted
  run, for every site in `sites` in one backward pass (the gradient of the summed metric through
  zero `edits.Add`s at every site; rows are independent, so each row gets its own gradient).

  clean, corrupt: (tokens, mask) [B, T] in the same layout. Returns (attributions, gradients),
  each {site: array of the site tap's shape} (block sites [L, ...]); `per_cell` sums out the
  feature axes."""
  sites = tuple(sites)
  check_sites(sites, "sites")
  if clean[0].shape != corrupt[0].shape:
    raise ValueError(f"attribution patching takes clean and corrupted batches of one shape, got {clean[0].shape} "
                     f"and {corrupt[0].shape}; pad both to the same length")
  return _attribution(params, cfg, metric, clean[0], clean[1], corrupt[0], corrupt[1], sites)


@functools.partial(jax.jit, static_argnames=("cfg", "metric", "sites"))
def _attribution(params, cfg, metric, clean_tokens, clean_mask, tokens, mask, sites):
  _, _, clean_cache = transformer.forward(params, clean_tokens, cfg, attention_mask=clean_mask, taps=sites)
  _, _, cache = transformer.forward(params, tokens, cfg, attention_mask=mask, taps=sites)

  def total(deltas):
    adds = Compose(tuple(Add(site=s, value=deltas[s], per_layer=s in BLOCK_SITES) for s in sites))
    logits, _, _ = transformer.forward(params, tokens, cfg, attention_mask=mask, intervene=adds)
    return metric(logits).sum()
  grads = jax.grad(total)({s: jnp.zeros_like(cache[s], jnp.float32) for s in sites})
  attr = {s: grads[s] * (clean_cache[s].astype(jnp.float32) - cache[s].astype(jnp.float32)) for s in sites}
  return attr, grads


def per_cell(values: jax.Array) -> jax.Array:
  """Sums a site-shaped array over its feature axes: [L, B, T] for [B, T, F] sites, [L, B, T, H]
  for per-head sites, [L, B, H, T] for scores / pattern (summed over keys); no L for non-block
  sites."""
  return values.sum(-1)                                   # the feature axis is last in every layout
