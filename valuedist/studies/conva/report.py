"""The ConVA study's report: control success (judge), fluency and MC accuracy per method and
condition -> summary.json, results.csv, report.md, control_vs_fluency.png, control_by_value.png."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np

from valuedist.eval import stats
from valuedist.studies import engine, report
from valuedist.studies.conva.inputs import METHODS, PREFIXES, Inputs


def summarise(records: list[dict], inputs: Inputs, c, extra: dict) -> dict:
  dil = [r for r in records if r["kind"] == "dilemma"]
  mc = [r for r in records if r["kind"] == "mc"]
  rows = []
  names = sorted({(r["method"], r["condition"]) for r in dil}, key=lambda t: (METHODS.index(t[0]), t[1]))
  for method, cond in names:
    for prefix in PREFIXES:
      sel = [r for r in dil if r["condition"] == cond and r["prefix"] == prefix]
      if not sel:
        continue
      success = np.asarray([r["toward"] > c.judge_threshold for r in sel], np.float64)
      m, lo, hi = stats.bootstrap_ci(success, n=c.bootstrap, seed=c.seed)
      ppl = np.asarray([r["perplexity"] for r in sel])
      mcsel = [r for r in mc if r["condition"] == cond]
      rows.append(dict(
          method=method, condition=cond, prefix=prefix, n=len(sel),
          control_success=round(m, 4), ci=[round(lo, 4), round(hi, 4)],
          mean_toward=round(float(np.mean([r["toward"] for r in sel])), 4),
          per_value={v: round(float(np.mean([r["toward"] > c.judge_threshold for r in sel if r["value"] == v])), 4)
                     for v in inputs.values if any(r["value"] == v for r in sel)},
          perplexity_median=round(float(np.median(ppl)), 3),
          degenerate_share=round(float(np.mean([r["degenerate"] for r in sel])), 4),
          gate_open_share=round(float(np.mean([r["gated"] for r in sel])), 4),
          mean_edit_norm=round(float(np.mean([r["edit_norm"] for r in sel])), 4),
          mc_accuracy=round(float(np.mean([r["correct"] for r in mcsel])), 4) if mcsel else None,
          mc_cloze_accuracy=round(float(np.mean([r["correct_cloze"] for r in mcsel])), 4) if mcsel else None))
  return {"config": json.loads(c.to_json_best_effort()), **extra, "results": rows}


def write_report(out: Path, s: dict) -> str:
  header = ["method", "condition", "prefix", "n", "control_success", "ci", "mean_toward", "perplexity_median",
            "degenerate_share", "gate_open_share", "mean_edit_norm", "mc_accuracy", "mc_cloze_accuracy"]
  report.write_csv(out / "results.csv", header, [[r[h] for h in header] for r in s["results"]])
  judge = ("a per-value classifier over its pooled hidden states" if s["judge_kind"] == "classifier" else
           f"`{s['answer_judge_model']}` asked yes or no")
  md = ["# ConVA study", "", f"Steered model: `{s['model']}`; gate model: `{s['judge_model']}`; answers judged by "
        f"{judge}{' of `' + s['judge_model'] + '`' if s['judge_kind'] == 'classifier' else ''}. "
        "Control success: share of answers the judge reads as leaning towards the value, over all test "
        "dilemmas (gated-off prompts included); perplexity of the answers under the unsteered model given the "
        "bare question. MC: general-knowledge questions answered by option letter and by option-text "
        "likelihood (cloze), each question under one value's steering (dealt round-robin); the prefix "
        "column applies to dilemmas only.", ""]
  ja = s.get("judge_on_labelled_answers") or {}
  if s["judge_kind"] == "classifier":
    md += [f"Judge features: block {s['judge_layer']} of `{s['judge_model']}`; gate features: block {s['gate_layer']}."]
  if ja:
    md += [f"Judge accuracy on the {ja['n']} shipped labelled answers (never used to fit it): {ja['overall']:.3f}."]
  md += ["", "## Steering results", "",
         "| method | condition | prefix | control success [95% CI] | perplexity (median) | degenerate | gate open | "
         "MC letters | MC cloze |", "|---|---|---|---|---|---|---|---|---|"]
  fmt3 = lambda x: "" if x is None else f"{x:.3f}"
  for r in s["results"]:
    md.append(f"| {r['method']} | {r['condition']} | {r['prefix']} | {r['control_success']:.3f} "
              f"[{r['ci'][0]:.3f}, {r['ci'][1]:.3f}] | {r['perplexity_median']:.2f} | {r['degenerate_share']:.3f} | "
              f"{r['gate_open_share']:.2f} | {fmt3(r['mc_accuracy'])} | {fmt3(r['mc_cloze_accuracy'])} |")
  values = list(s["probe_accuracy"])
  rows = [r for r in s["results"] if r["prefix"] == "none"]
  md += ["", "## Control success per value (no prefix)", "",
         "| condition | " + " | ".join(values) + " |", "|---|" + "---|" * len(values)]
  md += [f"| {r['condition']} | " + " | ".join(f"{r['per_value'].get(v, float('nan')):.2f}" for v in values) + " |"
         for r in rows]
  md += ["", "## Probes, judge and gate per value", "",
         "Probe accuracies are held-out (30% of scenarios). 'Transfer' is the non-controlled probe on the "
         "controlled test pairs at the controlled probe's best layer: accuracy / share of pairs it orders right "
         "(positive side scored above negative).", "",
         "| value | best layer | controlled probe | non-controlled probe | transfer | judge (pairs / answers) | gate | "
         "gate open on own dilemmas | on others' | on MC |",
         "|---|---|---|---|---|---|---|---|---|---|"]
  rates = s.get("gate_open_rates", {"dilemmas": {}, "mc": {}})
  for v, t in s["probe_accuracy"].items():
    l = t["best_layer"]
    own = rates["dilemmas"].get(v, {}).get(v)
    others = [x for d, x in rates["dilemmas"].get(v, {}).items() if d != v]
    fmt = lambda x: "-" if x is None else f"{x:.2f}"
    md.append(f"| {v} | {l} | {t['controlled_test'][l]:.3f} | {max(t['uncontrolled_test']):.3f} | "
              f"{t['uncontrolled_on_controlled_test'][l]:.3f} / {t['uncontrolled_pairwise_on_controlled_test'][l]:.3f} | "
              f"{s['judge_accuracy'].get(v, float('nan')):.3f} / {fmt(ja.get('per_value', {}).get(v))} | "
              f"{s['gate_accuracy'].get(v, float('nan')):.3f} | {fmt(own)} | "
              f"{fmt(float(np.mean(others)) if others else None)} | {fmt(rates['mc'].get(v))} |")
  text = "\n".join(md) + "\n"
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
