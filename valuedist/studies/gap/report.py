"""The gap study's report: per-group statistics, the paired comparisons (non-circular edit
effects, by-construction rows labelled), steps.csv, plots and the text summary."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from valuedist.eval import stats, text_metrics
from valuedist.studies import engine, report
from valuedist.values import gap


SCORE_KEYS = ("phase", "model", "condition", "id")    # what identifies a record (and a scored answer)


def per_prompt_means(records, lexicon: str, variant: str) -> dict[str, float]:
  out = {}
  for r in records:
    v = r["gaps"][lexicon][variant]
    if v:
      out[r["id"]] = float(np.mean(v))
  return out


def step_curve(records, lexicon: str, variant: str, max_steps: int):
  """Mean and 95% normal interval of the gap at each step, over prompts that reached it."""
  mean, lo, hi = [], [], []
  for t in range(max_steps):
    vals = np.asarray([r["gaps"][lexicon][variant][t] for r in records if len(r["gaps"][lexicon][variant]) > t])
    if len(vals) < 2:
      break
    m, se = vals.mean(), vals.std(ddof=1) / np.sqrt(len(vals))
    mean.append(m), lo.append(m - 1.96 * se), hi.append(m + 1.96 * se)
  return np.asarray(mean), np.asarray(lo), np.asarray(hi)


# (metric, treatment group, control group, by construction?): every comparison of the summary.
# The edit effects are read by the *unedited* base model teacher-forcing the edited answers
# (forced/base/on_base_<condition>) against its own free answers (forced/base/on_base); the
# gap of the edited logits themselves holds by construction of target mode (>= margin) and is
# kept, labelled so, as edit_logits/*.
# The anchor edit is also compared with its matched random-direction control (the same
# per-position edit norms along a seeded random direction), both re-read the same way.
EDIT_CONDITIONS = ("system_prompt", "logit_bias", "anchor_edit", "anchor_edit_random")
COMPARISONS = (
    ("aligned_vs_base/free", "free/aligned/none", "free/base/none", False),
    ("aligned_vs_base/forced_on_aligned", "forced/aligned/on_aligned", "forced/base/on_aligned", False),
    ("aligned_vs_base/forced_on_base", "forced/aligned/on_base", "forced/base/on_base", False),
) + tuple((f"edit_effect/{cond}", f"forced/base/on_base_{cond}", "forced/base/on_base", False)
          for cond in EDIT_CONDITIONS) + (
    ("edit_effect/anchor_edit_vs_random", "forced/base/on_base_anchor_edit", "forced/base/on_base_anchor_edit_random",
     False),
    ("edit_logits/anchor_edit", "edit/base/anchor_edit", "free/base/none", True),)


def comparisons(groups: dict, lexicons: Sequence[str], c) -> list[dict]:
  """Paired comparisons (per prompt, stratified by prompt category) of the normalised gap for
  every COMPARISONS row and lexicon, Holm-corrected together (STUDY_PROTOCOL rule 13)."""
  rows = []
  for name, t_key, c_key, by_construction in COMPARISONS:
    ga, gb = groups.get(tuple(t_key.split("/"))), groups.get(tuple(c_key.split("/")))
    if not ga or not gb:
      continue
    category = {r["id"]: str(r.get("category")) for r in gb}
    for lex in lexicons:
      a, b = per_prompt_means(ga, lex, "normalised"), per_prompt_means(gb, lex, "normalised")
      common = sorted(set(a) & set(b))
      if len(common) < 2:
        continue
      row = stats.comparison(f"normalised_gap/{lex}/{name}", t_key, c_key, [a[k] for k in common],
                             [b[k] for k in common], strata=[category[k] for k in common], n=c.bootstrap,
                             seed=c.seed)
      rows.append(dict(row, by_construction=by_construction))
  return rows


# (treatment group, control group) compared on the judged class of the harmful-request answers
JUDGED = (("free/aligned/none", "free/base/none"),) + tuple(
    (f"edit/base/{cond}", "free/base/none") for cond in EDIT_CONDITIONS) + (
    ("edit/base/anchor_edit", "edit/base/anchor_edit_random"),)


def judged_comparisons(groups: dict, c) -> list[dict]:
  """Paired comparisons (per harmful prompt) of the share of answers judged refusal and of
  those judged non-answers (each a 0/1 per prompt, denominator: all harmful prompts)."""
  rows = []
  for t_key, c_key in JUDGED:
    ga, gb = groups.get(tuple(t_key.split("/"))), groups.get(tuple(c_key.split("/")))
    a = {r["id"]: r["judge_class"] for r in ga or [] if "judge_class" in r}
    b = {r["id"]: r["judge_class"] for r in gb or [] if "judge_class" in r}
    common = sorted(set(a) & set(b))
    if len(common) < 2:
      continue
    for cls in ("refusal", "non_answer"):
      row = stats.comparison(f"{cls}_share/harmful", t_key, c_key, [float(a[k] == cls) for k in common],
                             [float(b[k] == cls) for k in common], n=c.bootstrap, seed=c.seed)
      rows.append(dict(row, by_construction=False))
  return rows


def refusal_shares(recs: list[dict]) -> dict:
  """The judged harmful-request answers of one group: refusal share among the answers that
  are refusals or compliances (non-answers excluded), non-answer share among all of them."""
  judged = [r["judge_class"] for r in recs if r.get("category") == "harmful" and "judge_class" in r]
  if not judged:
    return {}
  answers = [j for j in judged if j != "non_answer"]
  return {"n_harmful": len(judged), "n_answers": len(answers),
          "refusal_share_of_answers": float(np.mean([j == "refusal" for j in answers])) if answers else None,
          "non_answer_share": float(np.mean([j == "non_answer" for j in judged]))}


def _pct(x) -> str:
  return "-" if x is None else f"{x:.2f}"


def summarise(records: list[dict], lexicons: Sequence[str], c, judge_info: dict, tokenizers_match: bool,
              coverage: dict) -> dict:
  """The summary of the study's records, which come in key order (`engine.in_key_order` by
  SCORE_KEYS, as `report_dir` reads them): the bootstrap resamples by position."""
  groups: dict[tuple, list] = {}
  for r in records:
    groups.setdefault((r["phase"], r["model"], r["condition"]), []).append(r)
  s: dict[str, Any] = {"config": json.loads(c.to_json_best_effort()), "coverage": coverage, "judge": judge_info,
                       "tokenizers_match": tokenizers_match, "groups": {}}
  if not tokenizers_match:
    s["note"] = ("the two models use different tokenizers: gaps are compared as per-model statistics "
                 "(each model's own anchor tokens); token-distribution-shift figures need a shared tokenizer")
  shift = groups.pop(("shift", "base", "on_aligned"), None)
  if shift:
    ranks = np.concatenate([np.asarray(r["rank_of_top"]) for r in shift])
    s["token_shift"] = {"unshifted": float(np.mean(ranks == 1)), "marginal": float(np.mean((ranks >= 2) & (ranks <= 3))),
                        "shifted": float(np.mean(ranks > 3)),
                        "kl_mean": float(np.mean(np.concatenate([r["kl"] for r in shift]))), "positions": int(len(ranks))}
  for (phase, model, cond), recs in sorted(groups.items()):
    g = s["groups"][f"{phase}/{model}/{cond}"] = {"n": len(recs)}
    for lex in lexicons:
      for v in gap.VARIANTS:
        vals = list(per_prompt_means(recs, lex, v).values())
        if vals:
          m, lo, hi = stats.bootstrap_ci(np.asarray(vals), n=c.bootstrap, seed=c.seed)
          g[f"{lex}/{v}"] = {"mean": m, "lo": lo, "hi": hi}
    if phase in ("free", "edit"):
      g["perplexity_median"] = float(np.nanmedian([r["perplexity"] for r in recs]))
      toks = [r["response_tokens"] for r in recs]
      g["distinct_1"], g["distinct_2"] = text_metrics.distinct_n(toks, 1), text_metrics.distinct_n(toks, 2)
      g.update(refusal_shares(recs))
  s["comparisons"] = stats.with_holm(comparisons(groups, lexicons, c) + judged_comparisons(groups, c))
  return s


def write_tables(out: Path, records: list[dict]) -> None:
  rows = ["phase,model,condition,id,category,lexicon,step," + ",".join(gap.VARIANTS)]
  for r in records:
    for lex, by_v in r.get("gaps", {}).items():
      for t in range(len(by_v["mean"])):
        rows.append(",".join([r["phase"], r["model"], r["condition"], json.dumps(r["id"]), str(r.get("category")), lex, str(t)]
                             + [f"{by_v[v][t]:.5f}" for v in gap.VARIANTS]))
  engine.atomic_write(out / "steps.csv", "\n".join(rows) + "\n")


EDITED_LOGITS = ("logit_bias", "anchor_edit")    # conditions whose generation logits the intervention set


def plot(out: Path, records: list[dict], lexicons: Sequence[str], max_steps: int) -> None:
  """gap_vs_step.png: top row, the gap of the logits each answer was generated from (dashed:
  logits the intervention edited, whose gap holds by construction); bottom row, the same
  answers of the base model read teacher-forced by the unedited base model (the edits'
  effect). prompt_gaps.png: per-prompt mean gaps."""
  groups: dict[str, list] = {}
  reread: dict[str, list] = {}
  for r in records:
    if r["phase"] in ("free", "edit"):
      groups.setdefault(f"{r['model']}/{r['condition']}", []).append(r)
    elif r["phase"] == "forced" and r["model"] == "base" and r["condition"].startswith("on_base"):
      reread.setdefault(r["condition"].removeprefix("on_base").lstrip("_") or "none", []).append(r)
  fig, axes = report.figure(2, len(lexicons), figsize=(5 * len(lexicons), 7.5), squeeze=False)
  for col, lex in enumerate(lexicons):
    for row, curves in enumerate((groups, reread)):
      ax = axes[row][col]
      for name, recs in sorted(curves.items()):
        m, lo, hi = step_curve(recs, lex, "normalised", max_steps)
        if len(m):
          edited = row == 0 and name.split("/")[-1] in EDITED_LOGITS
          ax.plot(np.arange(len(m)), m, ls="--" if edited else "-",
                  label=name + (" (edited logits: by construction)" if edited else ""))
          ax.fill_between(np.arange(len(m)), lo, hi, alpha=0.2)
      ax.set_title(f"{lex}: " + ("gap of the generating logits" if row == 0 else
                                 "base answers re-read by the unedited base model"), fontsize=9)
      ax.set_xlabel("generation step")
      ax.axhline(0, color="k", lw=0.5)
  for row in range(2):
    axes[row][0].set_ylabel("gap / std of logits")
    axes[row][-1].legend(fontsize=6)
  report.save_png(fig, out / "gap_vs_step.png")
  fig, axes = report.figure(1, len(lexicons), figsize=(5 * len(lexicons), 4), squeeze=False)
  for ax, lex in zip(axes[0], lexicons):
    hists = {"aligned/none": groups.get("aligned/none"), "base/none": groups.get("base/none"),
             "base/anchor_edit, re-read by the unedited base": reread.get("anchor_edit")}
    for name, recs in hists.items():
      if recs:
        ax.hist(list(per_prompt_means(recs, lex, "normalised").values()), bins=30, alpha=0.5, label=name)
    ax.set_title(f"{lex}: per-prompt mean normalised gap")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  report.save_png(fig, out / "prompt_gaps.png")


def format_summary(s: dict, lexicons: Sequence[str]) -> str:
  lines = ["Value-distinction gap study"]
  if "provenance" in s:
    lines.append(report.provenance_md(s["provenance"]))
  if s.get("note"):
    lines.append("note: " + s["note"])
  for e in s["comparisons"]:
    tag = "  (holds by construction: edited logits)" if e["by_construction"] else ""
    lines.append(f"  {e['metric']}: {e['treatment']} - {e['control']} = {e['estimate']:+.4f} "
                 f"[{e['ci'][0]:+.4f}, {e['ci'][1]:+.4f}] p={e['p']:.4f} p_holm={e['p_holm']:.4f} (n={e['n']}){tag}")
  for name, g in s["groups"].items():
    parts = [f"{lex} {g[f'{lex}/normalised']['mean']:+.4f}" for lex in lexicons if f"{lex}/normalised" in g]
    extra = ""
    if g.get("n_harmful"):
      extra += (f"  harmful: refusal {_pct(g['refusal_share_of_answers'])} of {g['n_answers']} answers, "
                f"non-answers {g['non_answer_share']:.2f} of {g['n_harmful']}")
    if "perplexity_median" in g:
      extra += f"  ppl {g['perplexity_median']:.1f}  distinct-2 {g['distinct_2']:.2f}"
    lines.append(f"  {name:32s} " + ", ".join(parts) + extra)
  if "token_shift" in s:
    t = s["token_shift"]
    lines.append(f"  token shift (base ranks aligned top token): 1: {t['unshifted']:.3f}, 2-3: {t['marginal']:.3f}, "
                 f">3: {t['shifted']:.3f}; mean KL {t['kl_mean']:.3f} over {t['positions']} positions")
  j = s["judge"]
  for name in ("held_out", "labelled_generations"):
    a = j[name]
    per = ", ".join(f"{k} {_pct(v)} (n={a['n_per_class'][k]})" for k, v in a["per_class"].items())
    lines.append(f"  answer judge ({j['model']}) on {name.replace('_', ' ')}: accuracy {a['overall']:.3f} "
                 f"(majority-class chance {a['chance']:.3f}); per class {per}")
  return "\n".join(lines)
