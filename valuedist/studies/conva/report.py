"""The ConVA study's report: control success (judge), fluency and MC accuracy per method and
condition -> summary.json, results.csv, report.md, control_vs_fluency.png, control_by_value.png."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from valuedist.eval import stats
from valuedist.studies import engine, report
from valuedist.studies.conva.inputs import METHODS, PREFIXES


def _share(rows: list[dict], key: str):
  return round(float(np.mean([r[key] for r in rows])), 4) if rows else None


def _success(r: dict, c) -> float:
  return float(r["toward"] > c.judge_threshold)


def condition_row(method: str, cond: str, prefix: str, sel: list[dict], mc: list[dict], values, c) -> dict:
  """One row of the results table: control success over all the condition's test dilemmas,
  fluency, what acted (gate-open share only for gated conditions; edit norm per steered layer
  on the answers it edited), MC accuracy on all questions and on those it steered."""
  success = np.asarray([_success(r, c) for r in sel])
  m, lo, hi = stats.bootstrap_ci(success, n=c.bootstrap, seed=c.seed)
  gated = bool(sel[0]["gated"])
  edited = [r for r in sel if r["steered"] and r["edit_norm"] > 0 and r["layers"]]
  mc_steered = [r for r in mc if r["steered"]]
  return dict(
      method=method, condition=cond, prefix=prefix, n=len(sel), control_success=round(m, 4), ci=[round(lo, 4), round(hi, 4)],
      mean_toward=round(float(np.mean([r["toward"] for r in sel])), 4),
      per_value={v: round(float(np.mean([_success(r, c) for r in sel if r["value"] == v])), 4)
                 for v in values if any(r["value"] == v for r in sel)},
      perplexity_median=round(float(np.median([r["perplexity"] for r in sel])), 3),
      degenerate_share=_share(sel, "degenerate"), gated=gated,
      gate_open_share=_share(sel, "gate_open") if gated else None, steered_share=_share(sel, "steered"),
      edit_norm_per_layer=round(float(np.mean([r["edit_norm"] / len(r["layers"]) for r in edited])), 4) if edited else None,
      n_edited=len(edited), mc_accuracy=_share(mc, "correct"), mc_cloze_accuracy=_share(mc, "correct_cloze"),
      mc_n=len(mc), mc_accuracy_steered=_share(mc_steered, "correct"),
      mc_cloze_accuracy_steered=_share(mc_steered, "correct_cloze"), mc_n_steered=len(mc_steered))


def method_of_control(condition: str) -> str:
  """The condition a matched random-direction control belongs to ('...,random...' -> '...')."""
  return condition.replace(",random", "")


def _paired_success(dil: list[dict], treatment: str, control: str, prefix: str, c) -> list[dict]:
  """Control success of two conditions on the same dilemmas (paired, stratified by value)."""
  t = {r["id"]: r for r in dil if r["condition"] == treatment and r["prefix"] == prefix}
  b = {r["id"]: r for r in dil if r["condition"] == control and r["prefix"] == prefix}
  ids = sorted(set(t) & set(b))
  if len(ids) < 2:
    return []
  return [stats.comparison(f"control_success/prefix={prefix}", treatment, control, [_success(t[i], c) for i in ids],
                           [_success(b[i], c) for i in ids], strata=[t[i]["value"] for i in ids], n=c.bootstrap,
                           seed=c.seed)]


def comparisons(dil: list[dict], mc: list[dict], c) -> list[dict]:
  """Every condition against 'none' (same prefix), and every steering method against its
  matched random-direction control: control success paired by dilemma and stratified by
  value; MC accuracy (letters, cloze) paired by question. Holm across all."""
  rows = []
  by = lambda recs, key: {r["id"]: r[key] for r in recs}
  for prefix in PREFIXES:
    conds = sorted({r["condition"] for r in dil if r["prefix"] == prefix})
    for cond in conds:
      if cond != "none":
        rows += _paired_success(dil, cond, "none", prefix, c)
    for cond in conds:
      if method_of_control(cond) != cond and method_of_control(cond) in conds:
        rows += _paired_success(dil, method_of_control(cond), cond, prefix, c)
  base = [r for r in mc if r["method"] == "none"]
  for cond in sorted({r["condition"] for r in mc if r["method"] != "none"}):
    sel = [r for r in mc if r["condition"] == cond]
    for key in ("correct", "correct_cloze"):
      t, b = by(sel, key), by(base, key)
      ids = sorted(set(t) & set(b))
      if len(ids) >= 2:
        rows.append(stats.comparison(f"mc_{key}", cond, "none", [float(t[i]) for i in ids],
                                     [float(b[i]) for i in ids], n=c.bootstrap, seed=c.seed))
  return stats.with_holm(rows)


def floors_and_ceilings(dil: list[dict], c) -> list[dict]:
  """Values whose unsteered control success is 0 or 1 (per prefix): they cannot show an effect."""
  out = []
  for prefix in PREFIXES:
    for v in sorted({r["value"] for r in dil}):
      sel = [_success(r, c) for r in dil if r["method"] == "none" and r["prefix"] == prefix and r["value"] == v]
      if sel and np.mean(sel) in (0.0, 1.0):
        out.append({"value": v, "prefix": prefix, "unsteered_control_success": float(np.mean(sel)), "n": len(sel),
                    "flag": "ceiling" if np.mean(sel) == 1.0 else "floor"})
  return out


RECORD_KEY = ("kind", "method", "condition", "prefix", "value", "id")   # what identifies a record


def summarise(records: list[dict], values: Sequence[str], c, extra: dict) -> dict:
  """The summary of scored records (dilemma records carry the judge's 'toward'), which come in
  key order (`engine.in_key_order` by RECORD_KEY, as `report_dir` reads them): the bootstrap
  resamples by position."""
  dil = [r for r in records if r["kind"] == "dilemma"]
  mc = [r for r in records if r["kind"] == "mc"]
  names = sorted({(r["method"], r["condition"]) for r in dil}, key=lambda t: (METHODS.index(t[0]), t[1]))
  rows = [condition_row(method, cond, prefix, sel, [r for r in mc if r["condition"] == cond], values, c)
          for method, cond in names for prefix in PREFIXES
          for sel in [[r for r in dil if r["condition"] == cond and r["prefix"] == prefix]] if sel]
  return {"config": json.loads(c.to_json_best_effort()), **extra, "results": rows,
          "comparisons": comparisons(dil, mc, c), "floors_and_ceilings": floors_and_ceilings(dil, c)}


RESULT_COLUMNS = ["method", "condition", "prefix", "n", "control_success", "ci", "mean_toward", "perplexity_median",
                  "degenerate_share", "gated", "gate_open_share", "steered_share", "edit_norm_per_layer", "n_edited",
                  "mc_accuracy", "mc_cloze_accuracy", "mc_n", "mc_accuracy_steered", "mc_cloze_accuracy_steered",
                  "mc_n_steered"]


def _fmt(x, spec: str = ".3f") -> str:
  return "-" if x is None else format(x, spec)


def _results_md(s: dict) -> list[str]:
  md = ["## Steering results", "",
        "Control success: share of the condition's answers the judge reads as leaning towards the value, over "
        "*all* its test dilemmas (n). Gate open: share of those dilemmas whose value gate opened (gated "
        "conditions only). Steered: share the method acted on. Edit norm: L2 norm of the residual edit per "
        "steered layer, mean over the answers it edited. MC: accuracy over all questions dealt to the condition "
        "(n) and over those it steered (n steered).", "",
        "| condition | prefix | n | control success [95% CI] | ppl (median) | degenerate | gate open | steered | "
        "edit norm / layer | MC letters (all / steered, n) | MC cloze (all / steered) |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in s["results"]:
    md.append(f"| {r['condition']} | {r['prefix']} | {r['n']} | {r['control_success']:.3f} "
              f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {r['perplexity_median']:.2f} | {r['degenerate_share']:.3f} | "
              f"{_fmt(r['gate_open_share'], '.2f')} | {r['steered_share']:.2f} | {_fmt(r['edit_norm_per_layer'], '.2f')} | "
              f"{_fmt(r['mc_accuracy'])} / {_fmt(r['mc_accuracy_steered'])} ({r['mc_n']}/{r['mc_n_steered']}) | "
              f"{_fmt(r['mc_cloze_accuracy'])} / {_fmt(r['mc_cloze_accuracy_steered'])} |")
  md += ["", "## Paired comparisons", "",
         "Difference in share (treatment - control) on the same items, against no steering and, for every "
         "activation edit, against its matched random-direction control (`,random`: the same edit norms at the "
         "same sites along seeded random directions): dilemmas paired and resampled within values, "
         "MC questions paired; 95% percentile-bootstrap CI; p from a paired sign-flip test; Holm across the table.", "",
         "| metric | treatment | control | estimate [95% CI] | p | p (Holm) | n |", "|---|---|---|---|---|---|---|"]
  md += [f"| {e['metric']} | {e['treatment']} | {e['control']} | {e['estimate']:+.3f} [{e['ci'][0]:+.3f}, {e['ci'][1]:+.3f}] | "
         f"{e['p']:.4f} | {e['p_holm']:.4f} | {e['n']} |" for e in s["comparisons"]]
  return md


def _per_value_md(s: dict) -> list[str]:
  values = list(s["probe_accuracy"])
  flags = {(f["value"], f["prefix"]): f["flag"] for f in s["floors_and_ceilings"]}
  md = ["", "## Control success per value (no prefix)", "",
        "Values marked * are at a floor or ceiling unsteered: they cannot show an effect.", "",
        "| condition | " + " | ".join(v + ("*" if (v, "none") in flags else "") for v in values) + " |",
        "|---|" + "---|" * len(values)]
  md += [f"| {r['condition']} | " + " | ".join(f"{r['per_value'].get(v, float('nan')):.2f}" for v in values) + " |"
         for r in s["results"] if r["prefix"] == "none"]
  ja = s.get("judge_on_labelled_answers") or {}
  rates = s.get("gate_open_rates", {"dilemmas": {}, "mc": {}})
  md += ["", "## Probes, judge and gate per value", "",
         "Layers chosen on validation scenarios by the rule in the table; test accuracy read only at them "
         "(mean over the chosen layers). Transfer: the non-controlled probe on the controlled test pairs "
         "(accuracy / pairs ordered right). Probe, judge and gate sets are balanced: chance is 0.5 for each.", "",
         "| value | chosen layers (rule met) | val acc | test acc | non-controlled test | transfer | "
         "judge (held-out / answers) | gate | gate open: own dilemmas / others' / MC |",
         "|---|---|---|---|---|---|---|---|---|"]
  for v, t in s["probe_accuracy"].items():
    own = rates["dilemmas"].get(v, {}).get(v)
    others = [x for d, x in rates["dilemmas"].get(v, {}).items() if d != v]
    md.append(f"| {v} | {','.join(map(str, t['chosen_layers']))} ({'yes' if t['rule_met'] else 'no'}) | "
              f"{t['val_acc_at_chosen']:.3f} | {t['test_acc_at_chosen']:.3f} | {t['uncontrolled_test_at_chosen']:.3f} | "
              f"{t['transfer_at_chosen']:.3f} / {t['pairwise_uncontrolled_at_chosen']:.3f} | "
              f"{s['judge_accuracy'].get(v, float('nan')):.3f} / {_fmt(ja.get('per_value', {}).get(v), '.2f')} | "
              f"{s['gate_accuracy'].get(v, float('nan')):.3f} | {_fmt(own, '.2f')} / "
              f"{_fmt(float(np.mean(others)) if others else None, '.2f')} / {_fmt(rates['mc'].get(v), '.2f')} |")
  return md


def write_report(out: Path, s: dict) -> str:
  """results.csv and report.md from a summary."""
  report.write_csv(out / "results.csv", RESULT_COLUMNS, [[r[h] for h in RESULT_COLUMNS] for r in s["results"]])
  judge = ("a per-value classifier over its pooled hidden states (first token left out)" if s["judge_kind"] == "classifier"
           else f"`{s['answer_judge_model']}` asked yes or no")
  md = ["# ConVA study", "", report.provenance_md(s["provenance"]), "",
        f"Steered model: `{s['model']}`; gate model: `{s['judge_model']}`; answers judged by {judge}"
        f"{' of `' + s['judge_model'] + '`' if s['judge_kind'] == 'classifier' else ''}. Scenarios are split per value "
        f"(seed {s['config']['probe']['seed']}): probes and CAA vectors use the train scenarios, every choice the "
        "validation ones, the reported probe figures the test ones; judge and gate are trained on a disjoint "
        "detector share (statement/vignette forms for the judge"
        f"{'' if s['config'].get('judge_answers', 'none') == 'none' else ' plus its own labelled answers to questions disjoint from the validation answers'}"
        ", question forms plus the prompt set's value "
        "dilemmas and neutral text for the gate), never on the probes' text or the test dilemmas. ConVA's "
        "edits are decided once, at the prompt's answer position during prefill (where the probes were "
        "calibrated), and then held fixed for every generated token: a documented departure from re-solving "
        "them at each step."]
  ja = s.get("judge_on_labelled_answers") or {}
  if s["judge_kind"] == "classifier":
    md += ["", f"Judge features: block {s['judge_layer']} of `{s['judge_model']}`; gate features: block {s['gate_layer']}."]
  if ja:
    md += [f"Judge accuracy on the {ja['n']} shipped labelled answers (never used to fit it): {ja['overall']:.3f} "
           "(chance 0.5)."]
  text = "\n".join(md + [""] + _results_md(s) + _per_value_md(s)) + "\n"
  engine.atomic_write(out / "report.md", text)
  return text


def plot_results(out: Path, s: dict, values: Sequence[str]) -> None:
  rows = [r for r in s["results"] if r["prefix"] == "none"]
  fig, ax = report.figure(figsize=(7, 5))
  for r in rows:
    ax.scatter(r["perplexity_median"], r["control_success"], label=r["condition"])
  ax.set_xlabel("median perplexity under the unsteered model (lower = more fluent)")
  ax.set_ylabel("control success")
  ax.legend(fontsize=7)
  report.save_png(fig, out / "control_vs_fluency.png")
  fig, ax = report.figure(figsize=(12, 4.5))
  width = 0.8 / max(1, len(rows))
  for k, r in enumerate(rows):
    ax.bar(np.arange(len(values)) + k * width, [r["per_value"].get(v, np.nan) for v in values], width,
           label=r["condition"])
  ax.set_xticks(np.arange(len(values)) + 0.4 - width / 2, values, rotation=30, fontsize=8)
  ax.set_ylabel("control success")
  ax.legend(fontsize=7)
  report.save_png(fig, out / "control_by_value.png")
  rows = [e for e in s["comparisons"] if e["metric"].startswith("control_success")]
  if rows:
    fig, ax = report.figure(figsize=(10, 0.35 * len(rows) + 1.5))
    y = np.arange(len(rows))
    est = np.asarray([e["estimate"] for e in rows])
    ci = np.asarray([e["ci"] for e in rows])
    ax.errorbar(est, y, xerr=[est - ci[:, 0], ci[:, 1] - est], fmt="o", ms=4)
    ax.set_yticks(y, [f"{e['treatment']} - {e['control']} ({e['metric'].split('=')[-1]})" for e in rows], fontsize=7)
    ax.axvline(0, color="grey", lw=0.5)
    ax.set_xlabel("difference in control success (paired, 95% CI)")
    report.save_png(fig, out / "control_effects.png")
