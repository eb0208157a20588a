"""Worked example of model surgery: where a model computes a factual recall.

Clean prompts name a subject ('The capital city of France is the city of'), each corrupted
prompt names the next pair's subject, and the metric is logit(clean answer) minus
logit(corrupted answer) at the last token. For each grid (site x layer x position, or
x head) the corrupted run gets one cell patched from the clean run (activation patching), and
the first-order estimate of the same for every cell comes from one backward pass (attribution
patching). Both are reported as a share of the clean-corrupted gap, side by side, with their
agreement (Pearson r over cells, a bootstrap CI over pairs, a cell-permutation null).

Outputs in config.out_dir: grids/<site>.npz (per pair, raw metric), attribution_grids.npz
(per pair, the estimated change of the metric on each grid),
summary.json, cells.csv, patching_<site>.png, report.md. A rerun with the same config resumes
(finished grids are kept; each file is keyed by the config and model digest, not by the mesh:
the pairs are split across the mesh's data axis, on one process or several, and any layout
resumes any other).
"""
from __future__ import annotations

import io
import json
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from valuedist import checkpoints
from valuedist.interp import patching
from valuedist.model.batching import round_up
from valuedist.model.sites import LAYOUT
from valuedist.parallel import hosts, sharding
from valuedist.studies import report as rep
from valuedist.studies.engine import atomic_write, digest


def parse_pairs(text: str) -> list[tuple[str, str]]:
  pairs = [tuple(p.strip() for p in item.split(":")) for item in text.split(",") if item.strip()]
  if len(pairs) < 2 or any(len(p) != 2 or not all(p) for p in pairs):
    raise ValueError(f"config.pairs must list at least two 'subject:answer' items, got {text!r}")
  return pairs


def parse_grids(text: str) -> dict[str, tuple[str, ...]]:
  grids = {}
  for item in text.split(";"):
    site, _, axes = item.partition(":")
    grids[site.strip()] = tuple(a.strip() for a in axes.split(","))
    patching.check_grid(site.strip(), grids[site.strip()])
  return grids


def prompts(model, template: str, pairs, answer_prefix: str = " ") -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(tokens [N, T], answer ids [N], token labels [T]) of the clean prompts; every prompt must
  have one token count and every answer a distinct first token."""
  tok = model.tokenizer
  enc = lambda s: list(tok.encode(s, add_special_tokens=False))
  bos = [model.bos_id] if model.bos_id is not None and getattr(tok, "add_bos_token", False) else []
  rows = [bos + enc(template.format(s)) for s, _ in pairs]
  if len({len(r) for r in rows}) != 1:
    lengths = {s: len(r) for (s, _), r in zip(pairs, rows)}
    raise ValueError(f"the prompts differ in token count {lengths}; choose subjects of one token count")
  answers = [enc(answer_prefix + a)[0] for _, a in pairs]
  if len(set(answers)) != len(answers):
    raise ValueError("two answers share their first token; the logit difference cannot tell them apart")
  varying = [j for j in range(len(rows[0])) if len({r[j] for r in rows}) > 1]
  labels = ["{subject}" if j in varying else tok.decode([t]) for j, t in enumerate(rows[0])]
  return np.asarray(rows, np.int32), np.asarray(answers, np.int32), labels


def _grid_of(site: str, by: tuple[str, ...], attr: np.ndarray) -> np.ndarray:
  """An attribution array of the site's tap shape [L, N, ...] reduced to the grid [*by, N]."""
  cells = np.asarray(patching.per_cell(jnp.asarray(attr)))          # [L, N, T] / [L, N, T, H] / [L, N, H, T]
  if LAYOUT[site] == "bhts":
    cells = np.swapaxes(cells, 2, 3)
  if cells.ndim == 3:
    cells = cells[..., None]                                              # [L, N, T, 1]
  keep = {"position": 2, "head": 3}
  axes = [0] + [keep[a] for a in by[1:]]
  drop = tuple(a for a in (2, 3) if a not in axes)
  cells = cells.sum(drop, keepdims=True)
  order = axes + [1] + list(drop)
  return np.transpose(cells, order).reshape([cells.shape[a] for a in axes] + [cells.shape[1]])


def agreement(act: np.ndarray, attr: np.ndarray, gap: np.ndarray, rng, n_boot: int, n_perm: int) -> dict:
  """Pearson r over cells between the pair means of activation and attribution patching
  (each a share of the mean gap), a bootstrap CI over pairs, and a cell-permutation null."""
  def r_of(idx):
    a = (act[..., idx].mean(-1)).ravel() / gap[idx].mean()
    b = (attr[..., idx].mean(-1)).ravel() / gap[idx].mean()
    return float(np.corrcoef(a, b)[0, 1])
  n = gap.shape[0]
  obs = r_of(np.arange(n))
  boots = [r_of(rng.integers(0, n, n)) for _ in range(n_boot)]
  a = act.mean(-1).ravel()
  b = attr.mean(-1).ravel()
  null = np.asarray([np.corrcoef(a, rng.permutation(b))[0, 1] for _ in range(n_perm)])
  return {"observed": obs, "ci": [float(np.percentile(boots, 2.5)), float(np.percentile(boots, 97.5))],
          "chance": float(null.mean()), "null_percentile": float((null < obs).mean() * 100)}


def run(c) -> dict:
  out = Path(c.out_dir)
  pairs = parse_pairs(c.pairs)
  grids = parse_grids(c.grids)
  mesh = sharding.make_mesh(c.mesh.data or None, c.mesh.model)
  model = checkpoints.load(c.model, dtype=jnp.dtype(c.dtype), cache_dir=c.cache_dir or None, mesh=mesh,
                           layout=c.layout)
  clean, good, labels = prompts(model, c.template, pairs, c.answer_prefix)
  corrupt, bad = np.roll(clean, -1, 0), np.roll(good, -1)
  n = len(pairs)
  # where the run is written and how it is laid out never enter the key: any mesh, any process count resumes
  key = digest({k: v for k, v in c.to_dict().items() if k not in ("out_dir", "cache_dir", "mesh")},
               model.source, model.quantization)[:16]
  cfg_file = out / "config.json"
  stored = hosts.agree(json.loads(cfg_file.read_text()).get("key") if cfg_file.exists() else None)
  if stored not in (None, key):
    raise ValueError(f"{out} holds a run with another config or model; choose another --config.out_dir or delete it")
  atomic_write(cfg_file, json.dumps({"key": key, "config": json.loads(c.to_json())}, indent=1))

  params, cfg = model.params, model.cfg
  # rows split across the data axis: padded with copies of the last pair up to a multiple of it, cut after
  padded = lambda x: np.concatenate([x, np.repeat(x[-1:], round_up(n, mesh.shape[sharding.DATA]) - n, 0)])
  metric = patching.logit_difference(jnp.asarray(padded(good)), jnp.asarray(padded(bad)))
  cl, co, m = sharding.shard_batch((padded(clean), padded(corrupt), np.ones_like(padded(clean))), mesh)
  clean_m = hosts.to_host(metric(patching.run_with_cache(params, cl, cfg, (), attention_mask=m)[0]))[:n]
  corrupt_m = hosts.to_host(metric(patching.run_with_cache(params, co, cfg, (), attention_mask=m)[0]))[:n]
  gap = clean_m - corrupt_m

  cached = lambda name, compute: _cached(out / name, key, compute)
  sites = tuple(grids)
  attr = cached("attribution_grids.npz", lambda: {s: _grid_of(s, grids[s], hosts.to_host(a)[:, :n]) for s, a in
                                                   patching.attribution_patching(params, cfg, metric, (cl, m), (co, m),
                                                                                 sites)[0].items()})
  grid_metric = lambda site, by: cached(f"grids/{site}.npz", lambda: {"metric": hosts.to_host(
      patching.activation_patching(params, cfg, metric, (cl, m), (co, m), site, by, chunk=c.chunk))[..., :n]})["metric"]
  results, cells, comparisons = _compare(grids, grid_metric, attr, corrupt_m, gap, c)
  summary = {
      "model": rep.provenance({"model": model}),
      "task": {"template": c.template, "pairs": len(pairs), "metric": "logit(clean answer) - logit(corrupted answer), last token"},
      "behaviour": {"clean_metric_mean": float(clean_m.mean()), "corrupted_metric_mean": float(corrupt_m.mean()),
                    "pairs_with_clean_above_0": float((clean_m > 0).mean()),
                    "pairs_with_corrupted_below_0": float((corrupt_m < 0).mean())},
      "units": "each cell: change of the metric when that cell is patched clean -> corrupted, as a share of the "
               "mean clean-corrupted gap (1 = restores the clean behaviour), mean over pairs",
      "comparisons": comparisons}
  _write_outputs(out, summary, results, grids, cells, labels, cfg.n_layers)    # atomic_write: process 0 writes
  return summary


def _cached(path: Path, key: str, compute) -> dict:
  """The arrays in the .npz at `path` when it holds `key` (process 0's reading, on every
  process), else compute() written there (process 0) under `key`."""
  hit = None
  if hosts.is_writer() and path.exists():
    with np.load(path) as f:
      hit = str(f["key"]) == key
  if hosts.agree(hit):
    with np.load(path) as f:
      return {k: f[k] for k in f.files if k != "key"}
  t0 = time.time()
  arrays = compute()
  buf = io.BytesIO()
  np.savez(buf, key=key, **arrays)
  atomic_write(path, buf.getvalue())
  print(f"{path.name}: {time.time() - t0:.1f} s", flush=True)
  return arrays


def _compare(grids: dict, grid_metric, attr: dict, corrupt_m: np.ndarray, gap: np.ndarray, c):
  """Runs (or reads) each grid's activation patching; returns (site -> (activation, attribution)
  means as shares of the mean gap, csv rows, agreement comparisons)."""
  results, cells, comparisons = {}, [], []
  rng = np.random.default_rng(c.seed)
  start = time.time()
  for i, (site, by) in enumerate(grids.items()):
    effect = grid_metric(site, by) - corrupt_m                           # [*grid, N]: change of the metric
    eta = (time.time() - start) / (i + 1) * (len(grids) - i - 1)
    print(f"grid {i + 1}/{len(grids)} ({site}) ready, ETA {eta:.0f} s", flush=True)
    est = attr[site]                                                     # [*grid, N]
    results[site] = (effect.mean(-1) / gap.mean(), est.mean(-1) / gap.mean())
    ag = agreement(effect, est, gap, rng, c.bootstrap, c.permutations)
    comparisons.append({"metric": f"pearson r, activation vs attribution patching, {site} by {' x '.join(by)}",
                        **ag, "n": int(gap.shape[0])})
    for idx in np.ndindex(*effect.shape[:-1]):
      named = [f"{a}={j}" for a, j in zip(by, idx)] + [""] * (3 - len(by))
      cells.append([site, *named, round(float(results[site][0][idx]), 4), round(float(results[site][1][idx]), 4)])
  return results, cells, comparisons


def _write_outputs(out: Path, summary: dict, results: dict, grids: dict, cells: list, labels: list, n_layers: int):
  atomic_write(out / "summary.json", json.dumps(summary, indent=1))
  rep.write_csv(out / "cells.csv", ["site", "axis 1", "axis 2", "axis 3", "activation_patching", "attribution_patching"],
                cells)
  for site, by in grids.items():
    act, est = results[site]
    fig, axes = rep.figure(1, 2, figsize=(11, 0.18 * n_layers + 2))
    lim = max(np.abs(act).max(), np.abs(est).max(), 1e-6)
    for ax, grid, name in zip(axes, (act, est), ("activation patching", "attribution patching")):
      im = ax.imshow(grid.reshape(grid.shape[0], -1), aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
      ax.set_title(f"{site}: {name}")
      ax.set_ylabel("layer")
      if by[1:] == ("position",):
        ax.set_xticks(range(len(labels)), [repr(l)[1:-1] for l in labels], rotation=60, fontsize=7)
      else:
        ax.set_xlabel(" x ".join(by[1:]))
    fig.colorbar(im, ax=axes[1], label="share of the clean-corrupted gap restored")
    rep.save_png(fig, out / f"patching_{site}.png")
  lines = [f"# Activation vs attribution patching: {summary['task']['template']!r}", "",
           rep.provenance_md(summary["model"]), "",
           f"Pairs: {summary['task']['pairs']} (corrupted = the next pair's subject). Clean metric mean "
           f"{summary['behaviour']['clean_metric_mean']:.2f}, corrupted {summary['behaviour']['corrupted_metric_mean']:.2f}; "
           f"clean above 0 in {summary['behaviour']['pairs_with_clean_above_0']:.0%} of pairs, corrupted below 0 in "
           f"{summary['behaviour']['pairs_with_corrupted_below_0']:.0%}.", "", summary["units"] + ".", "",
           "| grid | r (activation vs attribution) | 95% CI over pairs | chance (permuted cells) | null percentile |",
           "|---|---|---|---|---|"]
  for comp in summary["comparisons"]:
    lines.append(f"| {comp['metric'].rsplit(', ', 1)[1]} | {comp['observed']:.3f} | [{comp['ci'][0]:.3f}, {comp['ci'][1]:.3f}] | "
                 f"{comp['chance']:.3f} | {comp['null_percentile']:.1f} |")
  lines += ["", "The five largest cells of each grid by activation patching:", "",
            "| site | cell | activation | attribution |", "|---|---|---|---|"]
  top = [r for site in grids for r in sorted((r for r in cells if r[0] == site), key=lambda r: -abs(r[-2]))[:5]]
  for r in top:
    lines.append(f"| {r[0]} | {', '.join(x for x in r[1:4] if x)} | {r[-2]:.3f} | {r[-1]:.3f} |")
  atomic_write(out / "report.md", "\n".join(lines) + "\n")
