"""The value-distinction study: measure the anchor-word gap of an aligned and a base model,
then construct the distinction in the base model by editing its last hidden state.

Phases (each a list of batch units, streamed to `records.jsonl`, skipped when done):
  free    each model answers every prompt (its own chat template, or none); gap per step
  forced  each model scores the other's and its own answers (URIAL-style teacher forcing)
  edit    the base model answers again under: a system prompt, a static logit bias, and
          anchor-word editing; gap per step, perplexity under the unedited model
Then a refusal judge (a linear classifier over another model's pooled hidden states,
trained on the shipped labelled responses) scores the harmful-request answers, and the
summary, CSV and plots are written.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from valuedist import data
from valuedist.checkpoints.tokenizer import check_lengths
from valuedist.eval import judges, stats, text_metrics
from valuedist.parallel import sharding
from valuedist.studies import engine, report, runner
from valuedist.studies.engine import ResultStore
from valuedist.studies.runner import Runner, check_generation_config
from valuedist.values import anchor_edit, gap, probes

CONDITIONS = ("none", "system_prompt", "logit_bias", "anchor_edit")


@dataclasses.dataclass
class Inputs:
  lexicons: list
  prompts: list[dict]


def resolve_inputs(c) -> Inputs:
  """Validates everything the run reads before anything is written (one-line errors)."""
  names = data.lexicon_names() if c.lexicons == "all" else [s.strip() for s in c.lexicons.split(",") if s.strip()]
  if not names:
    raise ValueError("config.lexicons is empty; name shipped lexicons (e.g. harmless,honest) or files, or 'all'")
  lexicons = [data.load_lexicon(n) for n in names]
  if c.edit.lexicon not in [l.name for l in lexicons]:
    raise ValueError(f"edit.lexicon {c.edit.lexicon!r} is not among config.lexicons ({', '.join(l.name for l in lexicons)})")
  prompts = data.load_prompts(c.prompts or None)
  if c.max_prompts:
    prompts = prompts[:c.max_prompts]
  check_generation_config(c)
  return Inputs(lexicons, prompts)


def _gap_lists(gaps: dict, row: int, n: int, names: Sequence[str], steps_axis_first: bool) -> dict:
  """{variant: [N, B, G] or [B, T, G]} -> {lexicon: {variant: [n floats]}} for one row."""
  out = {name: {} for name in names}
  for v, arr in gaps.items():
    a = np.asarray(arr)
    a = a[:n, row] if steps_axis_first else a[row, :n]
    for g, name in enumerate(names):
      out[name][v] = [round(float(x), 5) for x in a[:, g]]
  return out


def generate_phase(store: ResultStore, r: Runner, prompts, c, *, phase: str, condition: str,
                   system: str | None = None, intervene=None) -> None:
  """Free generation of every prompt under one condition; records gap per step and fluency."""
  token_lists = r.encode(prompts, system)
  batch = r.round_batch(c.batch_size)
  units = engine.batch_units(f"{phase}/{r.role}/{condition}", [len(t) for t in token_lists], batch, c.bucket)

  def work(u: engine.BatchUnit) -> list[dict]:
    idx = u.bucket.rows
    tokens, mask = r.batch([token_lists[i] for i in idx], u.bucket.length, batch)
    g, out, lengths, ppl = runner.generate_batch(r, tokens, mask, c, seed=c.seed + u.bucket.index,
                                                 intervene=intervene, observe=gap.observe_gap, observe_aux=r.anchors)
    records = []
    for row, i in enumerate(idx):
      n = int(lengths[row])
      resp = out[row, :n].tolist()
      records.append(dict(unit=u.key, phase=phase, model=r.role, condition=condition, id=prompts[i]["id"],
                          category=prompts[i].get("category"), response=r.model.tokenizer.decode(resp, skip_special_tokens=True),
                          response_tokens=resp, perplexity=float(ppl[row]),
                          gaps=_gap_lists(g.observed, row, n, r.anchors.names, True)))
    return records

  engine.stream(store, units, work, f"{phase} {r.role} {condition}")


def _with_answers(r: Runner, prompts, responses: dict[str, str], c) -> tuple[list, list, list]:
  """(prompts that have an answer, answer token lists (first max_new_tokens), prompt + answer
  token lists) for teacher forcing, in r's tokenizer and chat format."""
  prompts = [p for p in prompts if p["id"] in responses]
  resp_lists = [r.model.tokenizer.encode(responses[p["id"]], add_special_tokens=False)[:c.max_new_tokens]
                for p in prompts]
  return prompts, resp_lists, [a + b for a, b in zip(r.encode(prompts), resp_lists)]


def forced_phase(store: ResultStore, scorer: Runner, source: str, responses: dict[str, str], prompts, c) -> None:
  """Teacher forcing: `scorer` scores the `source` model's answers (text, retokenised)."""
  prompts, resp_lists, full = _with_answers(scorer, prompts, responses, c)
  batch = scorer.round_batch(c.batch_size)
  units = engine.batch_units(f"forced/{scorer.role}/{source}", [len(t) for t in full], batch, c.bucket)
  stats = None if scorer.cfg.final_softcap is not None else gap.unembed_stats(scorer.model.params, scorer.anchors, scorer.cfg)

  def work(u: engine.BatchUnit) -> list[dict]:
    idx, length = u.bucket.rows, u.bucket.length
    tokens, mask = scorer.batch([full[i] for i in idx], length, batch)
    gaps = gap.teacher_forced_gaps(scorer.model.params, tokens, mask, scorer.anchors, stats, scorer.cfg)
    gaps = {v: np.asarray(a) for v, a in gaps.items()}
    records = []
    for row, i in enumerate(idx):
      n_resp = len(resp_lists[i])
      start = length - n_resp - 1          # the position predicting the first response token
      sliced = {v: a[:, start:start + n_resp] for v, a in gaps.items()}
      records.append(dict(unit=u.key, phase="forced", model=scorer.role, condition=f"on_{source}",
                          id=prompts[i]["id"], category=prompts[i].get("category"),
                          gaps=_gap_lists(sliced, row, n_resp, scorer.anchors.names, False)))
    return records

  engine.stream(store, units, work, f"forced {scorer.role} on {source}")


def shift_phase(store: ResultStore, aligned: Runner, base: Runner, responses: dict[str, str], prompts, c) -> None:
  """URIAL token-distribution shift (shared tokenizer only): on the aligned model's answers,
  the base model's rank of the aligned model's top token, and KL(aligned || base), per step."""
  prompts, resp_lists, full = _with_answers(aligned, prompts, responses, c)
  batch = aligned.round_batch(c.batch_size)
  units = engine.batch_units("shift/base/on_aligned", [len(t) for t in full], batch, c.bucket)

  def work(u: engine.BatchUnit) -> list[dict]:
    idx, length = u.bucket.rows, u.bucket.length
    tokens, mask = aligned.batch([full[i] for i in idx], length, batch)
    s = gap.token_shift_batch(aligned.model.params, base.model.params, tokens, mask, aligned.cfg, base.cfg)
    rank, kl = np.asarray(s["rank_of_top"]), np.asarray(s["kl"])
    records = []
    for row, i in enumerate(idx):
      n = len(resp_lists[i])
      start = length - n - 1
      records.append(dict(unit=u.key, phase="shift", model="base", condition="on_aligned", id=prompts[i]["id"],
                          category=prompts[i].get("category"), rank_of_top=rank[row, start:start + n].tolist(),
                          kl=[round(float(x), 5) for x in kl[row, start:start + n]], gaps={}))
    return records

  engine.stream(store, units, work, "token shift base on aligned")


def fit_refusal_judge(judge: Runner, seed: int):
  """Linear refusal classifier over the judge model's mean-pooled final hidden states.
  Returns (probe, held-out accuracy)."""
  rows = data.load_refusal_labels()
  texts = [r["text"] for r in rows]
  y = np.asarray([r["label"] == "refusal" for r in rows], np.int32)
  x = judge.features(texts)
  tr, te = probes.split_train_test(len(y), test_frac=0.3, seed=seed)
  probe = judges.fit_text_classifier(x[tr], y[tr])
  acc = float(probes.accuracy(probe, x[te], y[te]))
  return judges.fit_text_classifier(x, y), acc


# ----------------------------------------------------------------------------- summary

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


def summarise(records: list[dict], lexicons: Sequence[str], c, judge_info: dict, tokenizers_match: bool,
              coverage: dict) -> dict:
  groups: dict[tuple, list] = {}
  for r in records:
    groups.setdefault((r["phase"], r["model"], r["condition"]), []).append(r)
  s: dict[str, Any] = {"config": json.loads(c.to_json_best_effort()), "coverage": coverage, "judge": judge_info,
                       "tokenizers_match": tokenizers_match, "groups": {}, "effects": {}}
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
      harmful = [r["refusal_prob"] for r in recs if r.get("category") == "harmful" and "refusal_prob" in r]
      if harmful:
        g["refusal_share_harmful"] = float(np.mean(np.asarray(harmful) > 0.5))
  for phase, a_key, b_key in (("free", "free/aligned/none", "free/base/none"),
                              ("forced_on_aligned", "forced/aligned/on_aligned", "forced/base/on_aligned"),
                              ("forced_on_base", "forced/aligned/on_base", "forced/base/on_base"),
                              ("edit", "edit/base/anchor_edit", "free/base/none")):
    ga, gb = groups.get(tuple(a_key.split("/"))), groups.get(tuple(b_key.split("/")))
    if not ga or not gb:
      continue
    for lex in lexicons:
      a = per_prompt_means(ga, lex, "normalised")
      b = per_prompt_means(gb, lex, "normalised")
      common = sorted(set(a) & set(b))
      if len(common) < 2:
        continue
      av, bv = np.asarray([a[k] for k in common]), np.asarray([b[k] for k in common])
      d, lo, hi = stats.bootstrap_diff_ci(av, bv, n=c.bootstrap, seed=c.seed, paired=True)
      s["effects"][f"{phase}/{lex}"] = {"first": a_key, "second": b_key, "diff": d, "lo": lo, "hi": hi,
                                        "cohens_d": stats.cohens_d(av, bv), "n": len(common)}
  return s


def write_tables(out: Path, records: list[dict]) -> None:
  rows = ["phase,model,condition,id,category,lexicon,step," + ",".join(gap.VARIANTS)]
  for r in records:
    for lex, by_v in r.get("gaps", {}).items():
      for t in range(len(by_v["mean"])):
        rows.append(",".join([r["phase"], r["model"], r["condition"], json.dumps(r["id"]), str(r.get("category")), lex, str(t)]
                             + [f"{by_v[v][t]:.5f}" for v in gap.VARIANTS]))
  engine.atomic_write(out / "steps.csv", "\n".join(rows) + "\n")


def plot(out: Path, records: list[dict], lexicons: Sequence[str], max_steps: int) -> None:
  groups: dict[str, list] = {}
  for r in records:
    if r["phase"] in ("free", "edit"):
      groups.setdefault(f"{r['model']}/{r['condition']}", []).append(r)
  fig, axes = report.figure(1, len(lexicons), figsize=(5 * len(lexicons), 4), squeeze=False)
  for ax, lex in zip(axes[0], lexicons):
    for name, recs in sorted(groups.items()):
      m, lo, hi = step_curve(recs, lex, "normalised", max_steps)
      if len(m):
        ax.plot(np.arange(len(m)), m, label=name)
        ax.fill_between(np.arange(len(m)), lo, hi, alpha=0.2)
    ax.set_title(f"{lex}: normalised gap per step")
    ax.set_xlabel("generation step")
    ax.axhline(0, color="k", lw=0.5)
  axes[0][0].set_ylabel("gap / std of logits")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  report.save_png(fig, out / "gap_vs_step.png")
  fig, axes = report.figure(1, len(lexicons), figsize=(5 * len(lexicons), 4), squeeze=False)
  for ax, lex in zip(axes[0], lexicons):
    for name in ("aligned/none", "base/none", "base/anchor_edit"):
      if name in groups:
        ax.hist(list(per_prompt_means(groups[name], lex, "normalised").values()), bins=30, alpha=0.5, label=name)
    ax.set_title(f"{lex}: per-prompt mean normalised gap")
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  report.save_png(fig, out / "prompt_gaps.png")


def format_summary(s: dict, lexicons: Sequence[str]) -> str:
  lines = ["Value-distinction gap study"]
  if s.get("note"):
    lines.append("note: " + s["note"])
  for key, e in s["effects"].items():
    lines.append(f"  {key}: normalised gap {e['first']} - {e['second']} = {e['diff']:+.4f} "
                 f"[{e['lo']:+.4f}, {e['hi']:+.4f}] (d={e['cohens_d']:+.2f}, n={e['n']})")
  for name, g in s["groups"].items():
    parts = [f"{lex} {g[f'{lex}/normalised']['mean']:+.4f}" for lex in lexicons if f"{lex}/normalised" in g]
    extra = ""
    if "refusal_share_harmful" in g:
      extra += f"  refusal(harmful) {g['refusal_share_harmful']:.2f}"
    if "perplexity_median" in g:
      extra += f"  ppl {g['perplexity_median']:.1f}  distinct-2 {g['distinct_2']:.2f}"
    lines.append(f"  {name:32s} " + ", ".join(parts) + extra)
  if "token_shift" in s:
    t = s["token_shift"]
    lines.append(f"  token shift (base ranks aligned top token): 1: {t['unshifted']:.3f}, 2-3: {t['marginal']:.3f}, "
                 f">3: {t['shifted']:.3f}; mean KL {t['kl_mean']:.3f} over {t['positions']} positions")
  lines.append(f"  refusal judge held-out accuracy: {s['judge'].get('accuracy', float('nan')):.3f} ({s['judge'].get('model')})")
  return "\n".join(lines)


def run(c) -> dict:
  """Runs (or resumes) the whole study described by config `c`; returns the summary."""
  inputs = resolve_inputs(c)
  lex_names = [l.name for l in inputs.lexicons]
  mesh = sharding.make_mesh(c.mesh_data or None)
  runners = {role: runner.load_runner(role, spec, c, inputs.lexicons, mesh)
             for role, spec in (("aligned", c.aligned), ("base", c.base))}
  for r in runners.values():      # every prompt must fit before anything is written
    for system in (None, c.system_prompt):
      check_lengths(r.encode(inputs.prompts, system), [p["id"] for p in inputs.prompts],
                    r.cfg.max_positions - c.max_new_tokens)
  out = Path(c.out_dir)
  store = ResultStore(out / "records.jsonl")
  engine.atomic_write(out / "config.json", c.to_json_best_effort(indent=2))
  for role, r in runners.items():
    generate_phase(store, r, inputs.prompts, c, phase="free", condition="none")
  answers = {role: {x["id"]: x["response"] for x in store.records() if x["phase"] == "free" and x["model"] == role}
             for role in runners}
  for scorer in runners.values():
    for source in runners:
      forced_phase(store, scorer, source, answers[source], inputs.prompts, c)
  tok_a, tok_b = runners["aligned"].model.tokenizer, runners["base"].model.tokenizer
  tokenizers_match = tok_a.get_vocab() == tok_b.get_vocab()
  if tokenizers_match:
    shift_phase(store, runners["aligned"], runners["base"], answers["aligned"], inputs.prompts, c)
  base = runners["base"]
  generate_phase(store, base, inputs.prompts, c, phase="edit", condition="system_prompt", system=c.system_prompt)
  generate_phase(store, base, inputs.prompts, c, phase="edit", condition="logit_bias",
                 intervene=anchor_edit.LogitBias.create(base.anchors, c.edit.lexicon, base.cfg.vocab_size, c.logit_bias))
  generate_phase(store, base, inputs.prompts, c, phase="edit", condition="anchor_edit",
                 intervene=runner.anchor_edit(base, c.edit.lexicon, c.edit))

  judge_role = c.judge if c.judge in runners else None
  judge = runners[judge_role] if judge_role else runner.load_runner("judge", c.judge, c, inputs.lexicons, mesh)
  probe, acc = fit_refusal_judge(judge, c.seed)
  records = store.records()
  gen = [r for r in records if r["phase"] in ("free", "edit") and r.get("category") == "harmful"]
  if gen:
    p = np.asarray(probe.prob(jnp.asarray(judge.features([r["response"] for r in gen]))))
    for r, pr in zip(gen, p):
      r["refusal_prob"] = float(pr)
  summary = summarise(records, lex_names, c, {"model": judge.model.name, "accuracy": acc}, tokenizers_match,
                      {role: r.coverage for role, r in runners.items()})
  write_tables(out, records)
  engine.atomic_write(out / "summary.json", json.dumps(summary, indent=2))
  plot(out, records, lex_names, c.max_new_tokens)
  text = format_summary(summary, lex_names)
  engine.atomic_write(out / "summary.txt", text + "\n")
  print(text)
  return summary
