"""The gap study's phases: free generation, the edit table (condition x prompt), the
teacher-forced table (source x prompt) and the token shift, each streamed to the study's store
(see the package docstring)."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from valuedist.eval import likelihood
from valuedist.model import sampler, transformer
from valuedist.parallel import sharding
from valuedist.studies import engine, runner, tables
from valuedist.studies.engine import ResultStore
from valuedist.studies.runner import Runner
from valuedist.values import anchor_edit, controls, gap


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
  todo = tables.pending_rows(store, keys, record_key)
  units = tables.table_units(f"forced/{scorer.role}", todo, keys, [len(t) for t in full],
                             ["all" if c.share_batches else source for source, _ in table], batch, c.bucket)
  stats = None if scorer.cfg.final_softcap is not None else gap.unembed_stats(scorer.model.params, scorer.anchors, scorer.cfg)

  def dispatch(u: tables.TableUnit):
    tokens, mask = scorer.batch([full[i] for i in u.rows], u.length, batch)
    return FORCED_GAPS(scorer.model.params, tokens, mask, scorer.anchors, stats, cfg=scorer.cfg)

  def collect(u: tables.TableUnit, dispatched) -> list[dict]:
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


def edit_conditions(base: Runner, lexicons: Sequence[str], c) -> list[EditCondition]:
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
    direction = controls.random_directions(c.seed, list(lexicons).index(c.edit.lexicon),
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
  return g.tokens, g.lengths, likelihood.answer_perplexity(params, cfg, tokens, mask, g.tokens, g.lengths), g.observed


EDIT_ANSWERS = engine.Programs(_edit_program, ("cfg", "mesh", "max_new_tokens", "sample"))


def edit_phase(store: ResultStore, base: Runner, prompts, lexicons: Sequence[str], c) -> list[str]:
  """The base model answers every prompt under every edit condition, as one row table
  (condition x prompt) whose rows share batches (config.share_batches); records as the free
  phase's (phase 'edit'; `lexicons`: the study's lexicon names). Returns the condition names."""
  conds = edit_conditions(base, lexicons, c)
  encoded = {system: base.encode(prompts, system) for system in dict.fromkeys(cd.system for cd in conds)}
  lists = [encoded[cd.system] for cd in conds]                           # conditions sharing a system prompt share its tokens
  table = [(k, i) for k in range(len(conds)) for i in range(len(prompts))]
  keys = [(conds[k].name, prompts[i]["id"]) for k, i in table]
  todo = tables.pending_rows(store, keys, lambda x: (x.get("condition"), x.get("id")) if x.get("phase") == "edit" else None)
  batch = base.round_batch(c.batch_size)
  units = tables.table_units("edit/base", todo, keys, [len(lists[k][i]) for k, i in table],
                             ["all" if c.share_batches else conds[k].name for k, _ in table], batch, c.bucket)
  eos = jnp.asarray(base.model.eos_ids, jnp.int32)

  def dispatch(u: tables.TableUnit):
    rows = [table[i] for i in u.rows]
    tokens, mask = base.batch([lists[k][i] for k, i in rows], u.length, batch)
    parts = [transformer.per_row(conds[k].iv, len(list(run))) for k, run in itertools.groupby(rows, lambda x: x[0])]
    ids = [tables.row_stream(*keys[i]) for i in u.rows]
    ids = sharding.shard_batch(np.asarray(ids + [0] * (batch - len(ids)), np.int32), base.mesh)
    return EDIT_ANSWERS(base.model.params, tokens, mask, transformer.concat_rows(parts, batch), ids, base.anchors, eos,
                        base.model.pad_id, jax.random.PRNGKey(c.seed), c.temperature, c.top_k, c.top_p, cfg=base.cfg,
                        mesh=base.mesh, max_new_tokens=c.max_new_tokens, sample=bool(c.sample))

  def collect(u: tables.TableUnit, dispatched) -> list[dict]:
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
