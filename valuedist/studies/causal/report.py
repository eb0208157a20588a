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
  lines = [f"# Causal value structure: `{s['model']}`", ""]
  lines += [report.provenance_md(s["provenance"]), ""] if "provenance" in s else []
  lines += [f"{s['roles']} roles + no-role baseline, {s['items']} items, PC alpha {s['alpha']}, "
           f"{s['bootstrap']} bootstrap resamples.", "",
           "## Agreement with the human reference", "", "```", json.dumps(s["agreement"], indent=1), "```", ""]
  lines += _chance_md(s)
  lines += ["## Edges (skeleton stability)", ""]
  lines += [f"- {e['a']} {e['type']} {e['b']}: stability {e['stability']:.2f}" for e in s["edges"]] or ["- none"]
  lines += _graph_steering_md(s.get("graph_steering"))
  lines += ["", "## Side effects, in-sample (kept for comparison: the role is chosen for small side effects on the "
            "same rows the graph is learnt from, so precision and recall are biased)", "",
            "| target | role | target change | mean abs non-target change | predicted | observed | precision "
            "| recall |", "|---|---|---|---|---|---|---|---|"]
  for t, e in s["role_steering"].items():
    lines.append(f"| {t} | {e['role']} | {e['target_change']:+.3f} | {e['mean_abs_non_target']:.3f} | "
                 f"{', '.join(e['predicted_names']) or '-'} | {', '.join(e['observed_names']) or '-'} | "
                 f"{_fmt(e['precision'])} | {_fmt(e['recall'])} |")
  if "option_mass" in s:
    lines += ["", _mass_line(s["option_mass"])]
  if "sae" in s:
    lines += _sae_md(s["sae"])
  return "\n".join(lines) + "\n"


def _sae_md(e: dict) -> list[str]:
  """The SAE section: quality, the residual norms setting the strength, each feature's held-out
  check, the dose-response against both controls, option mass and the feature's side effects."""
  q = e["quality"]
  md = ["", f"## SAE (layer {q['layer']}, width {q['width']}; steering mode '{e['mode']}', "
        f"positions '{e['positions']}')",
        "", f"MSE {q['mse']:.4g}, explained variance {q['explained_variance']:.3f}, L0 {q['l0']:.1f}, "
        f"dead latents {q['dead_share']:.3f} (held-out {q['rows']} token activations).", "",
        "Residual norm at the layer (corpus tokens, attention sinks excluded): "
        f"median {e['median_residual_norm']:.4g}, mean {e['mean_residual_norm']:.4g}. Coefficients are in units of "
        f"the {e['coef_unit']}. Positions: "
        "questionnaire answers are read from one forward pass over the prompt, so 'all' and 'prompt' (every prompt "
        "position, answer position included; no generated token) steer the same positions and give the same scores; "
        "they differ only in generation.", "",
        f"Features are chosen on training pairs only ({e['split']['held_out_share']:g} of each value's scenarios held "
        f"out, seed {e['split']['seed']}); held-out figures of the chosen (top) latent: standardised difference and "
        "pairwise accuracy (chance 0.5) with a one-sided sign-flip p.", "",
        "| value | latent | train score | held-out score | held-out accuracy | p | held-out pairs |",
        "|---|---|---|---|---|---|---|"]
  for v, rows in e["feature_validation"].items():
    h = rows[0]
    md.append(f"| {v} | {h['latent']} | {h['train_score']:.3f} | {_fmt(h['held_out_score'])} | "
              f"{_fmt(h['held_out_accuracy'])} | {_fmt(h['p'])} | {h['pairs']} |")
  md += ["", "Dose-response (sae_dose_response.png): target value-score change per coefficient for the feature, a "
         "random latent and a random direction of the same norm at the same layer and positions; feature - "
         "direction: paired over the target value's items, 95% bootstrap CI, Holm-corrected p across the table.", "",
         "| value | coef | feature | random latent | random direction | feature - direction [95% CI] | p (Holm) |"
         " option mass min |", "|---|---|---|---|---|---|---|---|"]
  md += _dose_rows(e)
  md += ["", _mass_line(e.get("option_mass", {})), "", "Side effects of the feature (all coefficients):", "",
         "| target | latent | coef | target change | mean abs non-target change | predicted | observed | precision "
         "| recall |", "|---|---|---|---|---|---|---|---|---|"]
  for x in e["steering"]:
    md.append(f"| {x['target']} | {x['latent']} | {x['coef']:+g} | {x['target_change']:+.3f} | "
              f"{x['mean_abs_non_target']:.3f} | {', '.join(x['predicted_names']) or '-'} | "
              f"{', '.join(x['observed_names']) or '-'} | {_fmt(x['precision'])} | {_fmt(x['recall'])} |")
  return md


def _dose_rows(e: dict) -> list[str]:
  """One row per (value, coefficient) of the SAE dose-response table."""
  at = {(x["value"], x["coef"], x["kind"]): x for x in e["dose_response"]}
  comp = {tuple(x["metric"].split("/")[1:]): x for x in e.get("comparisons", [])}
  rows = []
  for v, coef in dict.fromkeys((x["value"], x["coef"]) for x in e["dose_response"]):
    k = [at.get((v, coef, kind)) for kind in ("feature", "random_latent", "random_direction")]
    c = comp.get((v, f"{coef:g}"))
    diff = "-" if c is None else f"{c['estimate']:+.3f} [{c['ci'][0]:+.3f}, {c['ci'][1]:+.3f}]"
    rows.append(f"| {v} | {coef:+g} | " + " | ".join("-" if x is None else f"{x['target_change']:+.3f}" for x in k)
                + f" | {diff} | {'-' if c is None else _fmt(c['p_holm'])} | "
                f"{min(x['option_mass_min'] for x in k if x is not None):.3f} |")
  return rows


def _mass_line(m: dict) -> str:
  """One line: option mass (probability on '1'..'6' at the answer position) per scoring condition."""
  if not m:
    return "Option mass: not recorded."
  return ("Option mass (total probability on '1'..'6' at the answer position, per prompt; mean / min over the "
          "condition's prompts): " + "; ".join(f"{k} {x['mean']:.3f} / {x['min']:.3f} (lowest: {x['lowest_item']}"
                                              + (f" under {x['lowest_condition']})" if "lowest_condition" in x else ")")
                                              for k, x in m.items()) + ".")


def plot_dose_response(path: Path, dose: Sequence[dict], title: str) -> None:
  """One panel per value: target change against coefficient (symmetric log x) for each kind."""
  fig, axes = report.figure(2, (len(VALUES) + 1) // 2, figsize=(16, 6.5), squeeze=False, sharex=True)
  style = {"feature": ("C0", "o"), "random_latent": ("C1", "s"), "random_direction": ("C2", "^")}
  for ax, v in zip(axes.ravel(), VALUES):
    for kind, (color, marker) in style.items():
      pts = sorted((x["coef"], x["target_change"]) for x in dose if x["value"] == v and x["kind"] == kind)
      if pts:
        ax.plot(*zip(*pts), color=color, marker=marker, ms=3, lw=1, label=kind.replace("_", " "))
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("symlog", linthresh=0.05)
    coefs = sorted({x["coef"] for x in dose})
    ax.set_xticks(coefs, [f"{c:g}" for c in coefs], rotation=90)   # symlog's own ticks overlap near 0
    ax.set_title(v, fontsize=9)
    ax.tick_params(labelsize=7)
  axes[0, 0].legend(fontsize=7)
  axes[0, 0].set_ylabel("target score change")
  axes[1, 0].set_xlabel("coefficient")
  fig.suptitle(title, fontsize=10)
  report.save_png(fig, path)


def _chance_md(s: dict) -> list[str]:
  """Each agreement figure beside its chance level (STUDY_PROTOCOL rule 6)."""
  if "comparisons" not in s:
    return []
  md = ["Against chance: sign agreement under permuted scores (each value column permuted across roles, "
        "rows centred again); precision, recall and SHD under random graphs with as many edges. Percentile: "
        "share of null draws at or below the observed figure (for SHD, lower is better).", "",
        "| figure | observed [95% CI] | chance | null 95% interval | null percentile |", "|---|---|---|---|---|"]
  for e in [e for e in s["comparisons"] if "observed" in e]:
    ci = "" if e["ci"] is None else f" [{e['ci'][0]:.3f}, {e['ci'][1]:.3f}]"
    md.append(f"| {e['metric']} | {e['observed']:.3f}{ci} | {e['chance']:.3f} | "
              f"[{e['null_interval'][0]:.3f}, {e['null_interval'][1]:.3f}] | {e['null_percentile']:.1f} |")
  if s.get("centring_floor"):
    md += ["", "Centring floor: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                              for k, v in s["centring_floor"].items())]
  return md + [""]


def _graph_steering_md(g) -> list[str]:
  """The held-out graph-guided steering test: per target, the chosen role and the held-out mean
  |change| of the graph's neighbours (expected) and of the other values (unexpected)."""
  if not g:
    return []
  md = ["", "## Graph-guided steering, held out", "",
        f"Graph learnt on {len(g['design']['graph_roles'])} roles (+ no role); each target's role chosen among the "
        f"other {len(g['design']['steering_roles'])} on {len(g['design']['selection_items'])} items (largest rise "
        f"of the target); changes read on the other {len(g['design']['measurement_items'])} items (seed "
        f"{g['design']['seed']}). Expected: mean |change| of the target's graph neighbours; unexpected: of the "
        "other non-target values."]
  if "skipped" in g:
    return md + ["", f"Skipped: {g['skipped']}"]
  md += ["", "| target | role | target change | neighbours | expected | unexpected | difference |",
         "|---|---|---|---|---|---|---|"]
  f3 = lambda x: "-" if x is None else f"{x:+.3f}"
  md += [f"| {e['target']} | {e['role']} | {f3(e['target_change'])} | {', '.join(e['expected_values']) or '-'} | "
         f"{f3(e['expected'])} | {f3(e['unexpected'])} | {f3(e['difference'])} |" for e in g["targets"]]
  for e in g["comparisons"]:
    if "observed" in e:
      md += ["", f"Mean difference {e['observed']:+.4f}; under random graphs with as many edges: chance "
             f"{e['chance']:+.4f}, null 95% interval [{e['null_interval'][0]:+.4f}, {e['null_interval'][1]:+.4f}], "
             f"null percentile {e['null_percentile']:.1f}."]
    else:
      md += [f"Expected minus unexpected, paired by target: {e['estimate']:+.4f} [{e['ci'][0]:+.4f}, "
             f"{e['ci'][1]:+.4f}], p {e['p']:.3f} (n = {e['n']})."]
  return md


def _fmt(x) -> str:
  return "-" if x is None else f"{x:.2f}"


def named(effect: dict) -> dict:
  """A side-effect dict with its value indices also given by name."""
  return dict(effect, predicted_names=[VALUES[i] for i in effect["predicted"]],
              observed_names=[VALUES[i] for i in effect["observed"]])
