"""The causal study's report: graph and correlation plots, scores.csv and report.md."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from valuedist.studies import report
from valuedist.studies.causal.inputs import VALUES


def plot_graphs(path: Path, g: np.ndarray, stability: np.ndarray, ref_skeleton: np.ndarray, title: str) -> None:
  ang = np.pi / 2 - 2 * np.pi * np.arange(len(VALUES)) / len(VALUES)
  xy = np.stack([np.cos(ang), np.sin(ang)], 1)
  fig, axes = report.figure(1, 2, figsize=(12, 6))
  for ax, name in zip(axes, (title, "human reference (circumplex neighbours)")):
    ax.scatter(xy[:, 0], xy[:, 1], s=900, c="#dde", zorder=2)
    for i, v in enumerate(VALUES):
      ax.text(*xy[i], v.replace("_", "\n"), ha="center", va="center", fontsize=7, zorder=3)
    ax.set_title(name)
    ax.set_aspect("equal")
    ax.axis("off")
  for i in range(len(VALUES)):
    for j in range(i + 1, len(VALUES)):
      if ref_skeleton[i, j]:
        axes[1].plot(*xy[[i, j]].T, color="grey", lw=2, zorder=1)
      if g[i, j] != 0:
        directed = (g[i, j] == -1) != (g[j, i] == -1)
        a, b = (i, j) if g[i, j] == -1 and g[j, i] == 1 else (j, i)
        lw = 0.5 + 4 * stability[i, j]
        if directed:
          axes[0].annotate("", xy=xy[b] * 0.88, xytext=xy[a] * 0.88,
                           arrowprops=dict(arrowstyle="-|>", lw=lw, color="C0"))
        else:
          axes[0].plot(*xy[[i, j]].T * 0.88, color="C0", lw=lw, zorder=1)
        mid = (xy[i] + xy[j]) / 2 * 0.88
        axes[0].text(*mid, f"{stability[i, j]:.2f}", fontsize=6, color="C3")
  report.save_png(fig, path)


def plot_correlation(path: Path, corr: np.ndarray, title: str) -> None:
  fig, ax = report.figure(figsize=(7, 6))
  im = ax.imshow(corr, cmap="RdBu_r", vmin=-1, vmax=1)
  ax.set_xticks(range(len(VALUES)), VALUES, rotation=45, ha="right", fontsize=8)
  ax.set_yticks(range(len(VALUES)), VALUES, fontsize=8)
  for i in range(len(VALUES)):
    for j in range(len(VALUES)):
      ax.text(j, i, f"{corr[i, j]:.2f}", ha="center", va="center", fontsize=6)
  fig.colorbar(im)
  ax.set_title(title)
  report.save_png(fig, path)


def write_scores(path: Path, scores: np.ndarray, row_names: Sequence[str]) -> None:
  report.write_csv(path, ["role"] + list(VALUES), [[name] + [round(float(x), 5) for x in row]
                                                   for name, row in zip(row_names, scores)])


def format_report(s: dict) -> str:
  lines = [f"# Causal value structure: `{s['model']}`", "",
           f"{s['roles']} roles + no-role baseline, {s['items']} items, PC alpha {s['alpha']}, "
           f"{s['bootstrap']} bootstrap resamples.", "",
           "## Agreement with the human reference", "", "```", json.dumps(s["agreement"], indent=1), "```", ""]
  lines += _chance_md(s)
  lines += ["## Edges (skeleton stability)", ""]
  lines += [f"- {e['a']} {e['type']} {e['b']}: stability {e['stability']:.2f}" for e in s["edges"]] or ["- none"]
  lines += ["", "## Side effects: role prompting (best role per target value)", "",
            "| target | role | target change | mean abs non-target change | predicted | observed | precision | recall |",
            "|---|---|---|---|---|---|---|---|"]
  for t, e in s["role_steering"].items():
    lines.append(f"| {t} | {e['role']} | {e['target_change']:+.3f} | {e['mean_abs_non_target']:.3f} | "
                 f"{', '.join(e['predicted_names']) or '-'} | {', '.join(e['observed_names']) or '-'} | "
                 f"{_fmt(e['precision'])} | {_fmt(e['recall'])} |")
  if "sae" in s:
    q = s["sae"]["quality"]
    lines += ["", f"## SAE (layer {q['layer']}, width {q['width']}; steering mode '{s['sae']['mode']}')", "",
              f"MSE {q['mse']:.4g}, explained variance {q['explained_variance']:.3f}, L0 {q['l0']:.1f}, "
              f"dead latents {q['dead_share']:.3f} (held-out {q['rows']} token activations).", "",
              "| target | latent | coef | target change | mean abs non-target change | predicted | observed | precision | recall |",
              "|---|---|---|---|---|---|---|---|---|"]
    for e in s["sae"]["steering"]:
      lines.append(f"| {e['target']} | {e['latent']} | {e['coef']:+g} | {e['target_change']:+.3f} | "
                   f"{e['mean_abs_non_target']:.3f} | {', '.join(e['predicted_names']) or '-'} | "
                   f"{', '.join(e['observed_names']) or '-'} | {_fmt(e['precision'])} | {_fmt(e['recall'])} |")
  return "\n".join(lines) + "\n"


def _chance_md(s: dict) -> list[str]:
  """Each agreement figure beside its chance level (STUDY_PROTOCOL rule 6)."""
  if "comparisons" not in s:
    return []
  md = ["Against chance: sign agreement under permuted scores (each value column permuted across roles, "
        "rows centred again); precision, recall and SHD under random graphs with as many edges. Percentile: "
        "share of null draws at or below the observed figure (for SHD, lower is better).", "",
        "| figure | observed [95% CI] | chance | null 95% interval | null percentile |", "|---|---|---|---|---|"]
  for e in s["comparisons"]:
    ci = "" if e["ci"] is None else f" [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]"
    md.append(f"| {e['metric']} | {e['observed']:.3f}{ci} | {e['chance']:.3f} | "
              f"[{e['null_interval'][0]:.3f}, {e['null_interval'][1]:.3f}] | {e['null_percentile']:.1f} |")
  if s.get("centring_floor"):
    md += ["", "Centring floor: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in s["centring_floor"].items())]
  return md + [""]


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.2f}"


def named(effect: dict) -> dict:
  """A side-effect dict with its value indices also given by name."""
  return dict(effect, predicted_names=[VALUES[i] for i in effect["predicted"]],
              observed_names=[VALUES[i] for i in effect["observed"]])
