"""The gap study's phases, each a row table streamed to the study's store (see the package
docstring): the answer tables (condition x prompt) of free generation and of the edits, the
teacher-forced table (source x prompt) and the token shift (one row per answer)."""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable, Optional, Sequence

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


def _row_answered(phase: str, model: Optional[str] = None) -> Callable[[dict], Optional[tuple]]:
  """The row key (condition, prompt id) a record of `phase` (and of scoring `model`, if given)
  answers, None for other records: `tables.pending_rows`' record_key for the gap tables."""
  def key(x: dict) -> Optional[tuple]:
    mine = x.get("phase") == phase and (model is None or x.get("model") == model)
    return (x.get("condition"), x.get("id")) if mine else None
  return key


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
  nothing edited), as the answer table of the one condition 'none'; records gap per step and
  fluency (phase 'free')."""
  answer_table(store, r, "free", prompts, [EditCondition("none", None, None)], c)


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
  todo = tables.pending_rows(store, keys, _row_answered("forced", scorer.role))
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
  """URIAL token-distribution shift (shared tokenizer only) as a row table (one row per
  answered prompt): on the aligned model's answers, the base model's rank of the aligned
  model's top token, and KL(aligned || base), per step. Records: phase 'shift'."""
  prompts, resp_lists, full = _with_answers(aligned, prompts, responses, c)
  batch = aligned.round_batch(c.batch_size)
  keys = [("on_aligned", p["id"]) for p in prompts]
  todo = tables.pending_rows(store, keys, _row_answered("shift"))
  units = tables.table_units("shift/base", todo, keys, [len(t) for t in full], ["on_aligned"] * len(keys), batch, c.bucket)

  def dispatch(u: tables.TableUnit):
    tokens, mask = aligned.batch([full[i] for i in u.rows], u.length, batch)
    return TOKEN_SHIFT(aligned.model.params, base.model.params, tokens, mask, cfg_aligned=aligned.cfg, cfg_base=base.cfg)

  def collect(u: tables.TableUnit, dispatched) -> list[dict]:
    rank, kl = aligned.local(dispatched)
    records = []
    for row, i in aligned.mine(u.rows, batch):
      n = len(resp_lists[i])
      start = u.length - n - 1                # the position predicting the first answer token
      records.append(dict(_row=row, unit=u.key, phase="shift", model="base", condition="on_aligned", id=prompts[i]["id"],
                          category=prompts[i].get("category"), rank_of_top=rank[row, start:start + n].tolist(),
                          kl=[round(float(x), 5) for x in kl[row, start:start + n]], gaps={}))
    return records

  engine.stream(store, units, dispatch, "token shift base on aligned", collect=collect)


def _shift_program(params_aligned, params_base, tokens, mask, *, cfg_aligned, cfg_base):
  """`gap.token_shift_batch` of a batch: (rank of the aligned top token [B, T], KL [B, T])."""
  s = gap.token_shift_batch(params_aligned, params_base, tokens, mask, cfg_aligned, cfg_base)
  return s["rank_of_top"], s["kl"]


TOKEN_SHIFT = engine.Programs(_shift_program, ("cfg_aligned", "cfg_base"))


@dataclasses.dataclass(frozen=True, eq=False)
class EditCondition:
  """One way a model is made to answer: its system prompt (None = none) and its intervention
  (None = nothing edited; the edit conditions all share one class, `edit_conditions`)."""
  name: str
  system: str | None
  iv: transformer.Intervention | None


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


def _answer_program(params, tokens, mask, iv, row_ids, anchors, eos_ids, pad_id, key, temperature, top_k, top_p, *, cfg,
                  mesh, max_new_tokens, sample):
  """Everything an answer row needs, in one program: the (edited) answer to tokens, mask [B, T]
  (data-parallel generation) with the gap of each step (`gap.observe_gap`), and its perplexity
  under the unedited model given the same prompt. Returns (tokens [B, N], lengths [B],
  perplexity [B], observed {variant: [N, B, G], 'top_ids': [N, B, G, 2]})."""
  g = sampler.generate_data_parallel(params, tokens, mask, cfg, mesh=mesh, max_new_tokens=max_new_tokens,
                                     eos_ids=eos_ids, pad_id=pad_id, key=key, sample=sample, temperature=temperature,
                                     top_k=top_k, top_p=top_p, intervene=iv, observe=gap.observe_gap,
                                     observe_aux=anchors, row_ids=row_ids)
  return g.tokens, g.lengths, likelihood.answer_perplexity(params, cfg, tokens, mask, g.tokens, g.lengths), g.observed


ANSWERS = engine.Programs(_answer_program, ("cfg", "mesh", "max_new_tokens", "sample"))


def edit_phase(store: ResultStore, base: Runner, prompts, lexicons: Sequence[str], c) -> list[str]:
  """The base model answers every prompt under every edit condition (`lexicons`: the study's
  lexicon names), as one answer table (phase 'edit'). Returns the condition names."""
  conds = edit_conditions(base, lexicons, c)
  answer_table(store, base, "edit", prompts, conds, c)
  return [cd.name for cd in conds]


def answer_table(store: ResultStore, r: Runner, phase: str, prompts, conds: Sequence[EditCondition], c) -> None:
  """r answers every prompt under every condition, as one row table (condition x prompt)
  whose rows share batches (config.share_batches; else one condition per batch, the same
  records), each row with its condition's intervention fields and its own sampling stream.
  The conditions all carry an intervention of one class, or none at all (free generation).
  Records: `phase`, model r.role, the condition, the answer, its gap per step and its
  perplexity under the unedited model. Rows already recorded are reused."""
  encoded = {system: r.encode(prompts, system) for system in dict.fromkeys(cd.system for cd in conds)}
  lists = [encoded[cd.system] for cd in conds]                           # conditions sharing a system prompt share its tokens
  table = [(k, i) for k in range(len(conds)) for i in range(len(prompts))]
  keys = [(conds[k].name, prompts[i]["id"]) for k, i in table]
  todo = tables.pending_rows(store, keys, _row_answered(phase, r.role))
  batch = r.round_batch(c.batch_size)
  units = tables.table_units(f"{phase}/{r.role}", todo, keys, [len(lists[k][i]) for k, i in table],
                             ["all" if c.share_batches else conds[k].name for k, _ in table], batch, c.bucket)
  eos = jnp.asarray(r.model.eos_ids, jnp.int32)

  def dispatch(u: tables.TableUnit):
    rows = [table[i] for i in u.rows]
    tokens, mask = r.batch([lists[k][i] for k, i in rows], u.length, batch)
    iv = None
    if conds[0].iv is not None:
      iv = transformer.concat_rows([transformer.per_row(conds[k].iv, len(list(run)))
                                    for k, run in itertools.groupby(rows, lambda x: x[0])], batch)
    ids = [tables.row_stream(*keys[i]) for i in u.rows]
    ids = sharding.shard_batch(np.asarray(ids + [0] * (batch - len(ids)), np.int32), r.mesh)
    return ANSWERS(r.model.params, tokens, mask, iv, ids, r.anchors, eos, r.model.pad_id, jax.random.PRNGKey(c.seed),
                   c.temperature, c.top_k, c.top_p, cfg=r.cfg, mesh=r.mesh, max_new_tokens=c.max_new_tokens,
                   sample=bool(c.sample))

  def collect(u: tables.TableUnit, dispatched) -> list[dict]:
    out, lengths, ppl, observed = dispatched
    out, lengths, ppl = r.local((out, lengths, ppl))
    observed = r.local(dict(observed), axis=1)
    top = observed.pop("top_ids")                             # [N, B, G, 2]
    return [dict(_row=row, unit=u.key, phase=phase, model=r.role, condition=conds[table[u.rows[k]][0]].name,
                 id=prompts[table[u.rows[k]][1]]["id"], category=prompts[table[u.rows[k]][1]].get("category"),
                 **_answer_fields(r, row, out, lengths, ppl, observed, top))
            for row, k in r.mine(range(len(u.rows)), batch)]

  engine.stream(store, units, dispatch, f"{phase} {r.role} ({len(conds)} conditions)", collect=collect)
