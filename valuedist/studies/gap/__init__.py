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
The edit and forced phases are row tables (condition x prompt; source x prompt) whose rows
share batches (config.share_batches; else one condition or source per batch, the same
records), each row with its own intervention fields, one program per batch shape compiled
ahead of time, batch i+1 dispatched before batch i is read. Rows already recorded are reused
(`engine.pending_rows`), so an interrupted or older run resumes row by row.
Then a refusal judge (a linear classifier over another model's pooled hidden states,
trained on the shipped labelled responses) scores the harmful-request answers, and the
summary, CSV and plots are written.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from valuedist import data
from valuedist.checkpoints.tokenizer import check_lengths
from valuedist.eval import judges, likelihood
from valuedist.model import sampler, transformer
from valuedist.parallel import sharding
from valuedist.studies import engine, runner
from valuedist.studies.gap.report import EDIT_CONDITIONS, format_summary, plot, summarise, write_tables
from valuedist.studies.engine import ResultStore
from valuedist.studies.report import provenance
from valuedist.studies.runner import Runner, check_generation_config
from valuedist.values import anchor_edit, controls, gap, probes

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


def _gap_lists(gaps: dict, row: int, n: int, names: Sequence[str], steps_axis_first: bool) -> dict:
  """{variant: [N, B, G] or [B, T, G]} -> {lexicon: {variant: [n floats]}} for one row."""
  out = {name: {} for name in names}
  for v, arr in gaps.items():
    a = np.asarray(arr)
    a = a[:n, row] if steps_axis_first else a[row, :n]
    for g, name in enumerate(names):
      out[name][v] = [round(float(x), 5) for x in a[:, g]]
  return out


def _answer_fields(r: Runner, row: int, out, lengths, ppl, observed: dict, top) -> dict:
  """The record fields of one generated answer at batch row `row`: its text and tokens (out
  [B, N], lengths [B]), perplexity [B], gap per step (observed {variant: [N, B, G]}) and the
  top anchor ids per step (top [N, B, G, 2])."""
  n = int(lengths[row])
  resp = out[row, :n].tolist()
  return dict(response=r.model.tokenizer.decode(resp, skip_special_tokens=True), response_tokens=resp,
              perplexity=float(ppl[row]), gaps=_gap_lists(observed, row, n, r.anchors.names, True),
              top_anchor_ids={name: top[:n, row, gi].tolist() for gi, name in enumerate(r.anchors.names)})


def free_phase(store: ResultStore, r: Runner, prompts, c) -> None:
  """Free generation of every prompt by one model (its own chat template, no system prompt,
  nothing edited); records gap per step and fluency."""
  phase, condition = "free", "none"
  token_lists = r.encode(prompts)
  batch = r.round_batch(c.batch_size)
  units = engine.batch_units(f"{phase}/{r.role}/{condition}", [len(t) for t in token_lists], batch, c.bucket)

  def work(u: engine.BatchUnit) -> list[dict]:
    idx = u.bucket.rows
    tokens, mask = r.batch([token_lists[i] for i in idx], u.bucket.length, batch)
    g, out, lengths, ppl = runner.generate_batch(r, tokens, mask, c, seed=c.seed + u.bucket.index,
                                                 observe=gap.observe_gap, observe_aux=r.anchors)
    observed = r.local(dict(g.observed), axis=1)
    top = observed.pop("top_ids")                             # [N, B, G, 2]
    return [dict(_row=row, unit=u.key, phase=phase, model=r.role, condition=condition, id=prompts[i]["id"],
                 category=prompts[i].get("category"), **_answer_fields(r, row, out, lengths, ppl, observed, top))
            for row, i in r.mine(idx, batch)]

  engine.stream(store, units, work, f"{phase} {r.role} {condition}")


def _with_answers(r: Runner, prompts, responses: dict[str, str], c) -> tuple[list, list, list]:
  """(prompts that have an answer, answer token lists (first max_new_tokens), prompt + answer
  token lists) for teacher forcing, in r's tokenizer and chat format."""
  prompts = [p for p in prompts if p["id"] in responses]
  resp_lists = [r.model.tokenizer.encode(responses[p["id"]], add_special_tokens=False)[:c.max_new_tokens]
                for p in prompts]
  return prompts, resp_lists, [a + b for a, b in zip(r.encode(prompts), resp_lists)]


def forced_phase(store: ResultStore, scorer: Runner, answers: dict[str, dict[str, str]], prompts, c) -> None:
  """Teacher forcing as one row table (source x prompt): `scorer` scores the answers of every
  source ({source: {prompt id: text}}, retokenised), rows of all sources sharing batches
  (config.share_batches). Records: phase 'forced', condition 'on_<source>'."""
  table, full, resp = [], [], []
  for source, responses in answers.items():
    ps, resp_lists, lists = _with_answers(scorer, prompts, responses, c)
    table += [(source, p) for p in ps]
    resp += resp_lists
    full += lists
  batch = scorer.round_batch(c.batch_size)
  keys = [(f"on_{source}", p["id"]) for source, p in table]
  record_key = lambda x: (x.get("condition"), x.get("id")) if x.get("phase") == "forced" and x.get("model") == scorer.role \
      else None
  todo = engine.pending_rows(store, keys, record_key)
  units = engine.table_units(f"forced/{scorer.role}", todo, keys, [len(t) for t in full],
                             ["all" if c.share_batches else source for source, _ in table], batch, c.bucket)
  stats = None if scorer.cfg.final_softcap is not None else gap.unembed_stats(scorer.model.params, scorer.anchors, scorer.cfg)

  def dispatch(u: engine.TableUnit):
    tokens, mask = scorer.batch([full[i] for i in u.rows], u.length, batch)
    return FORCED_GAPS(scorer.model.params, tokens, mask, scorer.anchors, stats, cfg=scorer.cfg)

  def collect(u: engine.TableUnit, dispatched) -> list[dict]:
    gaps = scorer.local(dict(dispatched))
    records = []
    for row, k in scorer.mine(range(len(u.rows)), batch):
      i = u.rows[k]
      n_resp = len(resp[i])
      start = u.length - n_resp - 1          # the position predicting the first response token
      sliced = {v: a[:, start:start + n_resp] for v, a in gaps.items()}
      source, p = table[i]
      records.append(dict(_row=row, unit=u.key, phase="forced", model=scorer.role, condition=f"on_{source}",
                          id=p["id"], category=p.get("category"),
                          gaps=_gap_lists(sliced, row, n_resp, scorer.anchors.names, False)))
    return records

  engine.stream(store, units, dispatch, f"forced {scorer.role} on {len(answers)} sources", collect=collect)


def _forced_program(params, tokens, mask, anchors, stats, *, cfg):
  """`gap.teacher_forced_gaps` of a batch, {variant: [B, T, G]}, as a program compiled ahead of time."""
  return gap.teacher_forced_gaps(params, tokens, mask, anchors, stats, cfg)


FORCED_GAPS = engine.Programs(_forced_program, ("cfg",))


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
    rank, kl = aligned.local((s["rank_of_top"], s["kl"]))
    records = []
    for row, i in aligned.mine(idx, batch):
      n = len(resp_lists[i])
      start = length - n - 1
      records.append(dict(_row=row, unit=u.key, phase="shift", model="base", condition="on_aligned", id=prompts[i]["id"],
                          category=prompts[i].get("category"), rank_of_top=rank[row, start:start + n].tolist(),
                          kl=[round(float(x), 5) for x in kl[row, start:start + n]], gaps={}))
    return records

  engine.stream(store, units, work, "token shift base on aligned")


@dataclasses.dataclass(frozen=True, eq=False)
class EditCondition:
  """One way the base model is made to answer again: its system prompt (None = none) and its
  intervention, in the one class every edit condition shares (`edit_conditions`)."""
  name: str
  system: str | None
  iv: transformer.Intervention


def edit_conditions(base: Runner, inputs: Inputs, c) -> list[EditCondition]:
  """The edit conditions as one intervention class, Compose(LogitBias, AnchorEdit), differing
  only in per-row fields (beta; gate; control, zero = the edit's own direction), so rows of
  every condition share a batch: system_prompt (c.system_prompt, nothing edited),
  logit_bias (beta c.logit_bias), anchor_edit (gate 1) and, with c.controls, anchor_edit_random:
  the same per-position edit norms along a seeded random direction (STUDY_PROTOCOL rule 7)."""
  bias = anchor_edit.LogitBias.create(base.anchors, c.edit.lexicon, base.cfg.vocab_size)
  edit = runner.anchor_edit(base, c.edit.lexicon, c.edit)
  own = jnp.zeros((base.cfg.d_model,), jnp.float32)

  def make(beta: float, gate: float, control=own):
    return transformer.Compose((bias.replace(beta=jnp.asarray(beta, jnp.float32)),
                                edit.replace(gate=jnp.asarray(gate, jnp.float32), control=control)))
  conds = [EditCondition("system_prompt", c.system_prompt, make(0.0, 0.0)),
           EditCondition("logit_bias", None, make(c.logit_bias, 0.0)),
           EditCondition("anchor_edit", None, make(0.0, 1.0))]
  if c.controls:
    direction = controls.random_directions(c.seed, [l.name for l in inputs.lexicons].index(c.edit.lexicon),
                                           (base.cfg.d_model,))
    conds.append(EditCondition("anchor_edit_random", None, make(0.0, 1.0, direction)))
  return conds


def _edit_program(params, tokens, mask, iv, row_ids, anchors, eos_ids, pad_id, key, temperature, top_k, top_p, *, cfg,
                  mesh, max_new_tokens, sample):
  """Everything an edit row needs, in one program: the edited answer to tokens, mask [B, T]
  (data-parallel generation) with the gap of each step (`gap.observe_gap`), and its perplexity
  under the unedited model given the same prompt. Returns (tokens [B, N], lengths [B],
  perplexity [B], observed {variant: [N, B, G], 'top_ids': [N, B, G, 2]})."""
  g = sampler.generate_data_parallel(params, tokens, mask, cfg, mesh=mesh, max_new_tokens=max_new_tokens,
                                     eos_ids=eos_ids, pad_id=pad_id, key=key, sample=sample, temperature=temperature,
                                     top_k=top_k, top_p=top_p, intervene=iv, observe=gap.observe_gap,
                                     observe_aux=anchors, row_ids=row_ids)
  response_mask = (jnp.arange(max_new_tokens)[None] < g.lengths[:, None]).astype(jnp.int32)
  ppl = likelihood.perplexity(params, cfg, tokens, mask, jnp.where(response_mask > 0, g.tokens, 0), response_mask)
  return g.tokens, g.lengths, ppl, g.observed


EDIT_ANSWERS = engine.Programs(_edit_program, ("cfg", "mesh", "max_new_tokens", "sample"))


def edit_phase(store: ResultStore, base: Runner, inputs: Inputs, c) -> list[str]:
  """The base model answers every prompt under every edit condition, as one row table
  (condition x prompt) whose rows share batches (config.share_batches); records as the free
  phase's (phase 'edit'). Returns the condition names."""
  prompts = inputs.prompts
  conds = edit_conditions(base, inputs, c)
  lists = [base.encode(prompts, cd.system) for cd in conds]
  table = [(k, i) for k in range(len(conds)) for i in range(len(prompts))]
  keys = [(conds[k].name, prompts[i]["id"]) for k, i in table]
  todo = engine.pending_rows(store, keys, lambda x: (x.get("condition"), x.get("id")) if x.get("phase") == "edit" else None)
  batch = base.round_batch(c.batch_size)
  units = engine.table_units("edit/base", todo, keys, [len(lists[k][i]) for k, i in table],
                             ["all" if c.share_batches else conds[k].name for k, _ in table], batch, c.bucket)
  eos = jnp.asarray(base.model.eos_ids, jnp.int32)

  def dispatch(u: engine.TableUnit):
    rows = [table[i] for i in u.rows]
    tokens, mask = base.batch([lists[k][i] for k, i in rows], u.length, batch)
    parts = [transformer.per_row(conds[k].iv, len(list(run))) for k, run in itertools.groupby(rows, lambda x: x[0])]
    ids = [engine.row_stream(*keys[i]) for i in u.rows]
    ids = sharding.shard_batch(np.asarray(ids + [0] * (batch - len(ids)), np.int32), base.mesh)
    return EDIT_ANSWERS(base.model.params, tokens, mask, transformer.concat_rows(parts, batch), ids, base.anchors, eos,
                        base.model.pad_id, jax.random.PRNGKey(c.seed), c.temperature, c.top_k, c.top_p, cfg=base.cfg,
                        mesh=base.mesh, max_new_tokens=c.max_new_tokens, sample=bool(c.sample))

  def collect(u: engine.TableUnit, dispatched) -> list[dict]:
    out, lengths, ppl, observed = dispatched
    out, lengths, ppl = base.local((out, lengths, ppl))
    observed = base.local(dict(observed), axis=1)
    top = observed.pop("top_ids")                             # [N, B, G, 2]
    return [dict(_row=row, unit=u.key, phase="edit", model=base.role, condition=conds[table[u.rows[k]][0]].name,
                 id=prompts[table[u.rows[k]][1]]["id"], category=prompts[table[u.rows[k]][1]].get("category"),
                 **_answer_fields(base, row, out, lengths, ppl, observed, top))
            for row, k in base.mine(range(len(u.rows)), batch)]

  engine.stream(store, units, dispatch, f"edit base ({len(conds)} conditions)", collect=collect)
  return [cd.name for cd in conds]


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
  conditions = edit_phase(store, runners["base"], inputs, c)
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
  records = store.records()
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


SCORE_KEYS = ("phase", "model", "condition", "id")    # what identifies a scored answer


def report_dir(out) -> dict:
  """Recomputes the summary, tables and plots of a finished run from its folder alone
  (config.json, records.jsonl, judge_scores.jsonl, facts.json); returns the summary."""
  out = Path(out)
  c = ml_collections.ConfigDict(json.loads((out / "config.json").read_text()))
  facts = json.loads((out / "facts.json").read_text())
  records = ResultStore(out / "records.jsonl").records()
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
