"""The value-distinction study: measure the anchor-word gap of an aligned and a base model,
then construct the distinction in the base model by editing its last hidden state.

Phases (each a list of batch units, streamed to `records.jsonl`, skipped when done):
  free    each model answers every prompt (its own chat template, or none); gap per step
  edit    the base model answers again under: a system prompt, a static logit bias, and
          anchor-word editing, and (config.controls) the anchor edit's matched random-direction
          control; gap per step, perplexity under the unedited model
  forced  each model scores the other's and its own answers (URIAL-style teacher forcing),
          and the unedited base model re-reads each edited answer: the edit's effect on the
          gap, measured off the logits the edit set (which reach its margin by construction)
Every phase is a row table (condition x prompt for free and edited answers; source x prompt
for teacher forcing; one row per answer for the shift) whose rows share batches
(config.share_batches; else one condition or source per batch, the same records), each row
with its own intervention fields and sampling stream, one program per batch shape compiled
ahead of time, batch i+1 dispatched before batch i is read. Rows already recorded are reused
(`tables.pending_rows`), so an interrupted or older run resumes row by row.
Then a refusal judge (a linear classifier over another model's pooled hidden states,
trained on the shipped labelled responses) scores the harmful-request answers, and the
summary, CSV and plots are written.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp
import ml_collections
import numpy as np

from valuedist import data
from valuedist.checkpoints.tokenizer import check_lengths
from valuedist.eval import judges
from valuedist.studies import engine, runner
from valuedist.studies.gap.phases import edit_phase, forced_phase, free_phase, shift_phase
from valuedist.studies.gap.report import EDIT_CONDITIONS, SCORE_KEYS, format_summary, plot, summarise, write_tables
from valuedist.studies.engine import ResultStore
from valuedist.studies.report import provenance
from valuedist.studies.runner import Runner, check_generation_config
from valuedist.values import probes

CONDITIONS = ("none",) + EDIT_CONDITIONS


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


def refusal_training_rows(c) -> tuple[list[dict], int]:
  """The answer judge's training rows and how many of them are written responses: the
  project-written responses (config.refusal_labels), then the labelled generations of the
  embedded models on prompts outside the prompt set (config.refusal_generations; 'none' = skip),
  without any text that is also a validation generation."""
  written = data.load_refusal_labels(c.refusal_labels or None)
  generations = [] if c.get("refusal_generations", "none") == "none" else \
      data.load_refusal_labels(c.refusal_generations or data.REFUSAL_GENERATIONS_FILE)
  validation = {r["text"] for r in data.load_refusal_labels(c.refusal_validation or data.REFUSAL_VALIDATION_FILE)}
  return written + [r for r in generations if r["text"] not in validation], len(written)


def fit_refusal_judge(judge: Runner, c) -> tuple:
  """Three-class answer judge (data.LABELS: refusal / compliance / non-answer): one-vs-rest
  classifiers over the judge model's pooled final hidden states, trained on
  `refusal_training_rows`. Returns (probe w [3, D], info with its accuracy on a held-out 30%
  of those rows and on the labelled generations of the embedded models on the study's own
  prompts (config.refusal_validation, never trained on), per class, chance beside)."""
  rows, n_written = refusal_training_rows(c)
  y = np.asarray([data.LABELS.index(r["label"]) for r in rows])
  x = judge.features([r["text"] for r in rows])
  tr, te = probes.split_train_test(len(y), test_frac=0.3, seed=c.seed, labels=y)
  held = judges.class_accuracy(judges.predict(judges.fit_one_vs_rest(x[tr], y[tr], len(data.LABELS)), x[te]), y[te],
                               data.LABELS)
  probe = judges.fit_one_vs_rest(x, y, len(data.LABELS))
  val_rows = data.load_refusal_labels(c.refusal_validation or data.REFUSAL_VALIDATION_FILE)
  val = judges.class_accuracy(judges.predict(probe, judge.features([r["text"] for r in val_rows])),
                              [data.LABELS.index(r["label"]) for r in val_rows], data.LABELS)
  return probe, {"model": judge.model.name, "classes": list(data.LABELS), "held_out": held,
                 "labelled_generations": val, "accuracy": held["overall"],
                 "trained_on": {"written_responses": n_written, "labelled_generations": len(rows) - n_written}}


def run_phases(store: ResultStore, runners: dict[str, Runner], inputs: Inputs, c) -> bool:
  """Every generation and scoring phase (each resumable); returns whether the tokenizers match."""
  for role, r in runners.items():
    free_phase(store, r, inputs.prompts, c)
  conditions = edit_phase(store, runners["base"], inputs.prompts, [l.name for l in inputs.lexicons], c)
  records = store.records()
  answers = {role: {x["id"]: x["response"] for x in records if x["phase"] == "free" and x["model"] == role}
             for role in runners}
  edited = {f"base_{cond}": {x["id"]: x["response"] for x in records if x["phase"] == "edit" and x["condition"] == cond}
            for cond in conditions}
  for role, scorer in runners.items():   # the unedited base model also reads each edited answer (non-circular effect)
    forced_phase(store, scorer, answers | (edited if role == "base" else {}), inputs.prompts, c)
  tok_a, tok_b = runners["aligned"].model.tokenizer, runners["base"].model.tokenizer
  tokenizers_match = tok_a.get_vocab() == tok_b.get_vocab()
  if tokenizers_match:
    shift_phase(store, runners["aligned"], runners["base"], answers["aligned"], inputs.prompts, c)
  return tokenizers_match


def top_anchor_tokens(records: list[dict], runners: dict[str, Runner], top: int = 5) -> dict:
  """{model: {lexicon: {side: [(token, share of steps)]}}}: the anchor tokens most often
  holding the side's highest logit during free generation (what drives the 'max' variant)."""
  out = {}
  for role, r in runners.items():
    recs = [x for x in records if x["phase"] == "free" and x["model"] == role]
    out[role] = {}
    for lex in r.anchors.names:
      ids = np.asarray([pair for x in recs for pair in x["top_anchor_ids"][lex]]).reshape(-1, 2)
      out[role][lex] = {}
      for k, side in enumerate(("positive", "negative")):
        tokens, counts = np.unique(ids[:, k], return_counts=True)
        order = np.argsort(-counts, kind="stable")[:top]
        out[role][lex][side] = [(r.model.tokenizer.decode([int(tokens[i])]), round(float(counts[i]) / len(ids), 4))
                                for i in order]
  return out


# Config keys the records (generation, teacher-forced and shift phases) do not depend on: the
# refusal judge is fitted afresh and the statistics recomputed on every run; the tables' rows
# are reused row by row however they were batched.
RECORDS_DO_NOT_DEPEND_ON = ("judge", "refusal_labels", "refusal_generations", "refusal_validation", "bootstrap",
                            "share_batches")


@engine.on_study_mesh
def run(c, mesh) -> dict:
  """Runs (or resumes) the whole study described by config `c`; returns the summary."""
  engine.check_resume(Path(c.out_dir), c, RECORDS_DO_NOT_DEPEND_ON)     # before any model loads
  inputs = resolve_inputs(c)
  lex_names = [l.name for l in inputs.lexicons]
  runners = {role: runner.load_runner(role, spec, c, inputs.lexicons, mesh)
             for role, spec in (("aligned", c.aligned), ("base", c.base))}
  for r in runners.values():      # every prompt must fit before anything is written
    for system in (None, c.system_prompt):
      check_lengths(r.encode(inputs.prompts, system), [p["id"] for p in inputs.prompts],
                    r.cfg.max_positions - c.max_new_tokens)
  out = Path(c.out_dir)
  store = ResultStore(out / "records.jsonl")
  engine.atomic_write(out / "config.json", c.to_json_best_effort(indent=2))
  tokenizers_match = run_phases(store, runners, inputs, c)
  judge_role = c.judge if c.judge in runners else None
  judge = runners[judge_role] if judge_role else runner.load_runner("judge", c.judge, c, inputs.lexicons, mesh)
  probe, judge_info = fit_refusal_judge(judge, c)
  records = engine.in_key_order(store.records(), SCORE_KEYS)
  gen = [r for r in records if r["phase"] in ("free", "edit") and r.get("category") == "harmful"]
  x = judge.features([r["response"] for r in gen]) if gen else np.zeros((0, judge.cfg.d_model), np.float32)
  probs, classes = np.asarray(probe.prob(jnp.asarray(x))), judges.predict(probe, x)
  engine.atomic_write(out / "judge_scores.jsonl", "".join(
      json.dumps({k: r[k] for k in SCORE_KEYS} | {"judge_class": data.LABELS[int(k)], "refusal_prob": float(pr[0]),
                                                  "class_probs": [round(float(v), 5) for v in pr]},
                 sort_keys=True) + "\n" for r, pr, k in zip(gen, probs, classes)))
  top = top_anchor_tokens(records, runners)
  facts = {"lexicons": lex_names, "judge": judge_info,
           "tokenizers_match": tokenizers_match,
           "coverage": {role: dict(r.coverage, top_anchor_tokens=top[role])
                        for role, r in runners.items()},
           "provenance": provenance({role: r.model for role, r in runners.items()} | {"judge": judge.model})}
  engine.atomic_write(out / "facts.json", json.dumps(facts, indent=2))
  return report_dir(out)


def report_dir(out) -> dict:
  """Recomputes the summary, tables and plots of a finished run from its folder alone
  (config.json, records.jsonl, judge_scores.jsonl, facts.json); returns the summary."""
  out = Path(out)
  c = ml_collections.ConfigDict(json.loads((out / "config.json").read_text()))
  facts = json.loads((out / "facts.json").read_text())
  records = engine.in_key_order(ResultStore(out / "records.jsonl").records(), SCORE_KEYS)
  scores = {tuple(x[k] for k in SCORE_KEYS): x for x in ResultStore(out / "judge_scores.jsonl").records()}
  for r in records:
    if tuple(r.get(k) for k in SCORE_KEYS) in scores:
      r["judge_class"] = scores[tuple(r[k] for k in SCORE_KEYS)]["judge_class"]
  lex_names = facts["lexicons"]
  summary = summarise(records, lex_names, c, facts["judge"], facts["tokenizers_match"], facts["coverage"])
  summary["provenance"] = facts["provenance"]
  write_tables(out, records)
  engine.atomic_write(out / "summary.json", json.dumps(summary, indent=2))
  plot(out, records, lex_names, c.max_new_tokens)
  text = format_summary(summary, lex_names)
  engine.atomic_write(out / "summary.txt", text + "\n")
  print(text)
  return summary
