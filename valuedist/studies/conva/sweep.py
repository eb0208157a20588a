"""The steering sweep: per value x condition x prefix, greedy answers to the value's test
dilemmas with perplexity under the unsteered model; multiple-choice capability under every
condition.

The sweep is a table of rows (value x condition x prefix x item). Rows whose steering is one
intervention class (`program_kind`: every residual addition, i.e. none, prompting, CAA and
its control; ConVA; ConVA's control; each value's anchor edit) share batches across values,
conditions and prefixes (config.share_batches), each with its own intervention fields
(`transformer.per_row`). A batch holds rows of one padded length, every row's own length
rounded up to config.bucket, and always config.batch_size rows, so a row's numbers do not
depend on what it shares a batch with (the same shape gives the same bits): without
share_batches (one value x condition x prefix per batch, the unit-by-unit way) the records are
the same but for their unit. Each batch runs one program compiled ahead of time per kind and
shape (`engine.Programs`) doing all a row needs (generation and perplexity; or the letter
logits and the four cloze scores), and batch i+1 is dispatched before batch i is read
(`engine.stream(collect=...)`). Every batch is a unit of the study's store, and rows already
recorded are reused row by row (`tables.pending_rows`).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from valuedist.data import schwartz
from valuedist.eval import likelihood, text_metrics
from valuedist.model import sampler, transformer
from valuedist.model.batching import round_up
from valuedist.parallel import sharding
from valuedist.studies import engine, runner, tables
from valuedist.studies.conva.detect import gates
from valuedist.studies.conva.inputs import PREFIXES, Condition, Inputs, conditions, system_prompt
from valuedist.studies.engine import ResultStore
from valuedist.studies.runner import Runner
from valuedist.values import controls, conva

MC_CHOICE_TOKENS = 16     # option texts are scored on their first 16 tokens (cloze)


def intervention(r: Runner, cond: Condition, value: str, gate, ident: dict, anchor_edit, c):
  """The steering of one batch, acting on rows where gate [B] is 1 (the value's gate for a
  gated condition, all ones for an ungated one): `transformer.AddToResidual` deltas
  [B, L, D] for none/prompt/caa (one compiled program for all of them), ConVA's gated minimal
  activation (its deltas are decided in the sampler's own prefill), or the anchor edit. A
  control condition (`cond.control`) gives the method's matched random-direction control
  (`values.controls`; ConVA's is resolved on the batch's prompts inside its program: `_resolved`)."""
  b, nl, d = gate.shape[0], r.cfg.n_layers, r.cfg.d_model
  vi = schwartz.VALUES.index(value)
  if cond.method == "anchor":
    return anchor_edit.replace(gate=gate, control=controls.random_directions(c.seed, vi, (d,)) if cond.control
                               else None)
  if cond.method in ("none", "prompt"):
    return transformer.AddToResidual(jnp.zeros((b, nl, d), jnp.float32))
  steer = conva.layer_mask(cond.layers, nl)
  directions = controls.random_directions(c.seed, vi, (nl, d))
  vp = ident["controlled"]
  if cond.method == "caa":
    vectors = ident["caa"][vp.index(value)]
    vectors = controls.matched_caa(vectors, directions) if cond.control else vectors
    return transformer.AddToResidual(conva.added_deltas(vectors, steer, gate, cond.coef))
  k = vp.index(value)
  edit = conva.GatedMinimalActivation(vp.w[k], vp.b[k], steer, jnp.log(cond.p0 / (1 - cond.p0)), gate,
                                      jnp.asarray(float(c.remove)))
  return controls.MatchedConVA(edit, directions) if cond.control else edit


class AnchorEdits:
  """The anchor-word edit of each value (config.anchor), built on first use."""

  def __init__(self, r: Runner, c):
    self.r, self.c, self.edits = r, c, {}

  def get(self, cond: Condition, value: str):
    if cond.method != "anchor":
      return None
    if value not in self.edits:
      self.edits[value] = runner.anchor_edit(self.r, value, self.c.anchor)
    return self.edits[value]


# ----------------------------------------------------------------------------- the row table

@dataclasses.dataclass(frozen=True, eq=False)
class Row:
  """One answer the sweep asks for: item `item` of the value's dilemmas (or of the MC
  questions dealt to it) under a condition and prefix, with its chat-formatted prompt and
  the value's gate on it."""
  value: str
  cond: Condition
  prefix: str
  item: int
  tokens: list
  gate_open: bool
  extra: tuple = ()        # MC: (bare question tokens, [4] option-text token lists)
  id: str = ""             # the item's id (a dilemma's or question's)

  @property
  def applied(self) -> float:
    """1 where the condition's method acts on this item (the gate, for a gated method), else 0."""
    return float(self.gate_open or not self.cond.gated)

  def stream(self) -> int:
    """A stable id of the row (value, condition, prefix, item): its sampling stream."""
    return tables.row_stream(self.value, self.cond.name, self.prefix, self.item)


def program_kind(cond: Condition, value: str) -> str:
  """The intervention class a condition's rows run under; rows of one kind share programs and
  batches. The anchor edit's lexicon is the value's, so its rows share within a value."""
  if cond.method == "anchor":
    return f"anchor-{value}" + ("-control" if cond.control else "")
  if cond.method == "conva":
    return "conva-control" if cond.control else "conva"
  return "add"


@dataclasses.dataclass(frozen=True, eq=False)
class SweepUnit:
  """One batch of rows of one program kind and padded prompt length."""
  key: str
  kind: str
  length: int
  rows: tuple


def _record_key(rec: dict) -> tuple:
  """The row a sweep record answers: (kind, value, condition, prefix, id); MC records have no prefix."""
  return rec.get("kind"), rec.get("value"), rec.get("condition"), rec.get("prefix", "none"), rec.get("id")


def sweep_units(kind: str, rows: list[Row], batch: int, c, store: Optional[ResultStore] = None) -> list[SweepUnit]:
  """The rows ('dilemma' or 'mc' `kind`) packed into batches of at most `batch`
  (`tables.table_units`): grouped by program kind (with config.share_batches; else by value x
  condition x prefix), then by padded length (each row's own prompt length rounded up to
  config.bucket), in table order. Rows already recorded in `store` are left out
  (`tables.pending_rows`), so a rerun computes only the missing rows however they were batched."""
  keys = [(kind, r.value, r.cond.name, r.prefix, r.id) for r in rows]
  todo = range(len(rows)) if store is None else tables.pending_rows(store, keys, _record_key)
  groups = [program_kind(r.cond, r.value) if c.share_batches else f"{r.value}/{r.cond.name}/{r.prefix}" for r in rows]
  return [SweepUnit(u.key, program_kind(rows[u.rows[0]].cond, rows[u.rows[0]].value), u.length,
                    tuple(rows[i] for i in u.rows))
          for u in tables.table_units(kind, todo, keys, [len(r.tokens) for r in rows], groups, batch, c.bucket)]


def batch_intervention(r: Runner, u: SweepUnit, ident: dict, edits: "AnchorEdits", batch: int, c):
  """The intervention of a batch: each run of rows of one value and condition gets its
  condition's intervention (`intervention`, gated per row) in per-row form; the runs are
  concatenated and padded to `batch` rows."""
  parts = []
  for (value, cond), run in itertools.groupby(u.rows, key=lambda row: (row.value, row.cond)):
    run = list(run)
    gate = jnp.asarray([row.applied for row in run], jnp.float32)
    parts.append(transformer.per_row(intervention(r, cond, value, gate, ident, edits.get(cond, value), c), len(run)))
  return transformer.concat_rows(parts, batch)


def _resolved(iv, params, tokens, mask, cfg):
  """ConVA's control becomes the fixed edit the method would decide on these prompts,
  re-pointed (`controls.MatchedConVA.on`); other interventions as given."""
  return iv.on(params, tokens, mask, cfg) if isinstance(iv, controls.MatchedConVA) else iv


# ----------------------------------------------------------------------------- dilemmas

def _answer_program(params, tokens, mask, plain_tokens, plain_mask, iv, row_ids, eos_ids, pad_id, key, temperature,
                    top_k, top_p, *, cfg, mesh, max_new_tokens, sample):
  """Everything a dilemma row needs, in one program: the steered answer to tokens, mask
  [B, T] (data-parallel generation) and its perplexity under the unsteered model given the
  bare question plain_tokens, plain_mask [B, P]. Returns (tokens [B, N], lengths [B],
  perplexity [B], summed edit norm over layers [B]: 0 for edits that are not residual
  additions, i.e. the anchor edit)."""
  iv = _resolved(iv, params, tokens, mask, cfg)
  g = sampler.generate_data_parallel(params, tokens, mask, cfg, mesh=mesh, max_new_tokens=max_new_tokens,
                                     eos_ids=eos_ids, pad_id=pad_id, key=key, sample=sample, temperature=temperature,
                                     top_k=top_k, top_p=top_p, intervene=iv, row_ids=row_ids)
  ppl = likelihood.answer_perplexity(params, cfg, plain_tokens, plain_mask, g.tokens, g.lengths)
  d = g.decode_intervention
  norms = (jnp.linalg.norm(d.vectors, axis=-1).sum(-1) if isinstance(d, transformer.AddToResidual)
           else jnp.zeros(tokens.shape[:1], jnp.float32))
  return g.tokens, g.lengths, ppl, norms


ANSWERS = engine.Programs(_answer_program, ("cfg", "mesh", "max_new_tokens", "sample"))


def encode_items(r: Runner, items: list[dict], cond: Condition, prefix: str, prefixes: dict, gate: np.ndarray,
                 key: str) -> list[list[int]]:
  """Token lists of the items, each with its own system prompt (prompting adds the value's
  high prefix only where it acts)."""
  systems = {g: system_prompt(cond, prefix, prefixes, gate_open=g) for g in (False, True)}
  if systems[False] == systems[True]:              # the system prompt does not depend on the gate
    return r.encode(items, systems[False], key=key)
  by_gate = {g: r.encode(items, system, key=key) for g, system in systems.items()}
  return [by_gate[bool(g)][i] for i, g in enumerate(gate)]


def dilemma_rows(r: Runner, gate_p: dict, ident: dict, inputs: Inputs, c) -> list[Row]:
  """The dilemma table: value x condition x prefix x test dilemma."""
  rows = []
  for v in inputs.values:
    prompts = inputs.dilemmas[v]
    gate = gates(gate_p, inputs, prompts, v, c)
    for cond in conditions(c, inputs, r.cfg.n_layers, ident["controlled"], v):
      for prefix in (PREFIXES if c.robustness else ("none",)):
        lists = encode_items(r, prompts, cond, prefix, inputs.prefixes[v], gate, "question")
        rows += [Row(v, cond, prefix, i, lists[i], bool(gate[i]), id=prompts[i]["id"]) for i in range(len(prompts))]
  return rows


def _steering_fields(cond: Condition, gate_open: bool, norm: float) -> dict:
  """Per-record description of what acted: the gate's decision, whether the method steered
  this item, its edit norm (summed over layers) and the layers it spans."""
  gate_open = bool(gate_open)
  steered = cond.method != "none" and (gate_open or not cond.gated)
  return dict(gated=cond.gated, gate_open=gate_open, steered=steered, random_control=cond.control,
              edit_norm=round(float(norm), 4),
              layers=list(cond.layers) if cond.layers else None)


def sweep_dilemmas(store: ResultStore, r: Runner, gate_p: dict, ident: dict, inputs: Inputs, c) -> None:
  batch = r.round_batch(c.batch_size)
  edits = AnchorEdits(r, c)
  # perplexity is conditioned on the bare question (no system prompt), under the unsteered
  # model, so every condition's fluency is measured on the same footing; one width for all
  plain = {v: r.encode(inputs.dilemmas[v], key="question") for v in inputs.values}
  plain_length = round_up(max(len(l) for ls in plain.values() for l in ls), c.bucket)
  eos = jnp.asarray(r.model.eos_ids, jnp.int32)

  def dispatch(u: SweepUnit):
    tokens, mask = r.batch([row.tokens for row in u.rows], u.length, batch)
    pt, pm = r.batch([plain[row.value][row.item] for row in u.rows], plain_length, batch)
    ids = sampler_row_ids(r, u.rows, batch)
    return ANSWERS(r.model.params, tokens, mask, pt, pm, batch_intervention(r, u, ident, edits, batch, c), ids, eos,
                   r.model.pad_id, jax.random.PRNGKey(c.seed), c.temperature, c.top_k, c.top_p, cfg=r.cfg,
                   mesh=r.mesh, max_new_tokens=c.max_new_tokens, sample=bool(c.sample))

  def collect(u: SweepUnit, dispatched) -> list[dict]:
    out, lengths, ppl, norms = r.local(dispatched)
    records = []
    for row, i in r.mine(range(len(u.rows)), batch):
      x = u.rows[i]
      resp = out[row, :int(lengths[row])].tolist()
      records.append(dict(_row=row, unit=u.key, kind="dilemma", value=x.value, condition=x.cond.name,
                          method=x.cond.method, prefix=x.prefix, id=inputs.dilemmas[x.value][x.item]["id"],
                          **_steering_fields(x.cond, x.gate_open, norms[row]),
                          response=r.model.tokenizer.decode(resp, skip_special_tokens=True),
                          response_tokens=resp, perplexity=float(ppl[row]), degenerate=text_metrics.is_degenerate(resp)))
    return records

  engine.stream(store, sweep_units("dilemma", dilemma_rows(r, gate_p, ident, inputs, c), batch, c, store), dispatch,
                "dilemmas", collect=collect)


def sampler_row_ids(r: Runner, rows, batch: int):
  """[batch] int32 on the data axis: each row's stable sampling stream (`Row.stream`; padding
  rows after them), so a sampled answer does not depend on the batch it is in."""
  ids = [row.stream() for row in rows]
  return sharding.shard_batch(np.asarray(ids + [0] * (batch - len(ids)), np.int32), r.mesh)


# ----------------------------------------------------------------------------- multiple choice

def _mc_program(params, lettered, lettered_mask, bare, bare_mask, choices, letters, iv, *, cfg):
  """Everything a multiple-choice row needs, in one program: the argmax over the option
  letters' logits after the lettered question lettered, lettered_mask [B, T] ([B]), and the
  option text with the highest summed log-probability after the bare question bare,
  bare_mask [B, P] ([B]; choices: one (tokens, mask) [B, C] per option)."""
  pick = likelihood.option_logits(params, cfg, lettered, lettered_mask, letters,
                                  _resolved(iv, params, lettered, lettered_mask, cfg)).argmax(-1)
  iv = _resolved(iv, params, bare, bare_mask, cfg)
  cloze = jnp.stack([likelihood.response_logprobs(params, cfg, bare, bare_mask, ct, cm, iv).sum(-1)
                     for ct, cm in choices], -1)
  return pick, cloze.argmax(-1)


MC_SCORES = engine.Programs(_mc_program, ("cfg",))


def mc_rows(r: Runner, gate_p: dict, ident: dict, inputs: Inputs, c) -> list[Row]:
  """The multiple-choice table: each question is dealt round-robin to a target value and
  asked under every condition of that value (gate included)."""
  tok = r.model.tokenizer
  owner = {q["id"]: inputs.values[i % len(inputs.values)] for i, q in enumerate(inputs.mc)}
  rows = []
  for v in inputs.values:
    qs = [q for q in inputs.mc if owner[q["id"]] == v]
    if not qs:
      continue
    gate = gates(gate_p, inputs, qs, v, c)
    choices = [[tok.encode(ch, add_special_tokens=False)[:MC_CHOICE_TOKENS] for ch in q["choices"]] for q in qs]
    for cond in conditions(c, inputs, r.cfg.n_layers, ident["controlled"], v):
      lettered = encode_items(r, [{"prompt": schwartz.mc_prompt(q)} for q in qs], cond, "none", inputs.prefixes[v],
                              gate, "prompt")
      bare = encode_items(r, qs, cond, "none", inputs.prefixes[v], gate, "question")
      rows += [Row(v, cond, "none", i, lettered[i], bool(gate[i]), (bare[i], choices[i]), qs[i]["id"])
               for i in range(len(qs))]
  return rows


def sweep_mc(store: ResultStore, r: Runner, gate_p: dict, ident: dict, inputs: Inputs, c) -> None:
  """General capability under steering. The multiple-choice questions are dealt round-robin
  to the target values and each is answered under its value's version of every condition
  (gate included), so each condition's accuracy covers every question once. Two answers per
  question: the argmax over the option-letter logits after the lettered question (`correct`),
  and the option text with the highest summed log-probability after the bare question
  (`correct_cloze`: informative for small models, which pick letters near chance)."""
  batch = r.round_batch(c.batch_size)
  letters = jnp.asarray(likelihood.option_token_ids(r.model.tokenizer, schwartz.MC_LETTERS))
  edits = AnchorEdits(r, c)
  rows = mc_rows(r, gate_p, ident, inputs, c)
  if not rows:
    return
  bare_length = round_up(max(len(row.extra[0]) for row in rows), c.bucket)      # one width for every batch
  owner_qs = {v: [q for i, q in enumerate(inputs.mc) if inputs.values[i % len(inputs.values)] == v]
              for v in inputs.values}

  def dispatch(u: SweepUnit):
    tokens, mask = r.batch([row.tokens for row in u.rows], u.length, batch)
    bt, bm = r.batch([row.extra[0] for row in u.rows], bare_length, batch)
    choices = tuple(r.batch([row.extra[1][k] for row in u.rows], MC_CHOICE_TOKENS, batch, left=False)
                    for k in range(len(schwartz.MC_LETTERS)))
    return MC_SCORES(r.model.params, tokens, mask, bt, bm, choices, letters,
                     batch_intervention(r, u, ident, edits, batch, c), cfg=r.cfg)

  def collect(u: SweepUnit, dispatched) -> list[dict]:
    pick, pick_cloze = r.local(dispatched)
    out = []
    for row, i in r.mine(range(len(u.rows)), batch):
      x = u.rows[i]
      q = owner_qs[x.value][x.item]
      out.append(dict(_row=row, unit=u.key, kind="mc", value=x.value, condition=x.cond.name, method=x.cond.method,
                      id=q["id"], **_steering_fields(x.cond, x.gate_open, 0.0), correct=bool(pick[row] == q["answer"]),
                      correct_cloze=bool(pick_cloze[row] == q["answer"])))
    return out

  engine.stream(store, sweep_units("mc", rows, batch, c, store), dispatch, "multiple choice", collect=collect)
