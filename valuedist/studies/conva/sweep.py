"""The steering sweep: per value x condition x prefix, greedy answers to the value's test
dilemmas with perplexity under the unsteered model; multiple-choice capability under every
condition. Every batch is a unit of the study's store."""
from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from valuedist.data import schwartz
from valuedist.eval import likelihood, text_metrics
from valuedist.model import transformer
from valuedist.model.batching import round_up
from valuedist.studies import engine, runner
from valuedist.studies.conva.detect import gates
from valuedist.studies.conva.inputs import PREFIXES, Condition, Inputs, conditions, system_prompt
from valuedist.studies.engine import Bucket, ResultStore
from valuedist.studies.runner import Runner
from valuedist.values import controls, conva

MC_CHOICE_TOKENS = 16     # option texts are scored on their first 16 tokens (cloze)


def intervention(r: Runner, cond: Condition, value: str, gate, ident: dict, anchor_edit, c):
  """The steering of one batch, acting on rows where gate [B] is 1 (the value's gate for a
  gated condition, all ones for an ungated one): `transformer.AddToResidual` deltas
  [B, L, D] for none/prompt/caa (one compiled program for all of them), ConVA's gated minimal
  activation (its deltas are decided in the sampler's own prefill), or the anchor edit. A
  control condition (`cond.control`) gives the method's matched random-direction control
  (`values.controls`; ConVA's needs the batch: see `resolve`)."""
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


def resolve(r: Runner, iv, tokens, mask):
  """The intervention to run on prompts tokens, mask [B, T]: ConVA's control becomes the
  fixed edit the method would decide on exactly these prompts, re-pointed; others as given."""
  return iv.on(r.model.params, tokens, mask, r.cfg) if isinstance(iv, controls.MatchedConVA) else iv


def edit_norms(r: Runner, decode_intervention, batch: int) -> np.ndarray:
  """[B] summed L2 norm over layers of the residual edits a generation applied (0 for edits
  that are not residual additions, i.e. the anchor edit), at this process's own rows."""
  if isinstance(decode_intervention, transformer.AddToResidual):
    return r.local(jnp.linalg.norm(decode_intervention.vectors, axis=-1).sum(-1))
  return np.zeros(batch)


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


# ----------------------------------------------------------------------------- dilemmas

@dataclasses.dataclass(frozen=True, eq=False)
class DilemmaUnit:
  """One batch of a value's dilemmas under one condition and prefix."""
  key: str
  value: str
  cond: Condition
  prefix: str
  bucket: Bucket
  lists: list            # chat-formatted token lists of all the value's dilemmas (system prompt per item)
  gate: np.ndarray       # [N] 1/0: the value's gate per dilemma


def applied(cond: Condition, gate: np.ndarray) -> np.ndarray:
  """[N] 1/0: where the condition's method acts (the gate for gated methods, else everywhere)."""
  return gate if cond.gated else np.ones_like(gate)


def encode_items(r: Runner, items: list[dict], cond: Condition, prefix: str, prefixes: dict, gate: np.ndarray,
                 key: str) -> list[list[int]]:
  """Token lists of the items, each with its own system prompt (prompting adds the value's
  high prefix only where it acts)."""
  systems = {g: system_prompt(cond, prefix, prefixes, gate_open=g) for g in (False, True)}
  if systems[False] == systems[True]:              # the system prompt does not depend on the gate
    return r.encode(items, systems[False], key=key)
  by_gate = {g: r.encode(items, system, key=key) for g, system in systems.items()}
  return [by_gate[bool(g)][i] for i, g in enumerate(gate)]


def dilemma_units(r: Runner, gate_p: dict, ident: dict, inputs: Inputs, c) -> list[DilemmaUnit]:
  batch = r.round_batch(c.batch_size)
  units = []
  for v in inputs.values:
    prompts = inputs.dilemmas[v]
    gate = gates(gate_p, inputs, prompts, v, c)
    for cond in conditions(c, inputs, r.cfg.n_layers, ident["controlled"], v):
      for prefix in (PREFIXES if c.robustness else ("none",)):
        lists = encode_items(r, prompts, cond, prefix, inputs.prefixes[v], gate, "question")
        units += [DilemmaUnit(f"dilemma/{v}/{cond.name}/{prefix}/{b.index}", v, cond, prefix, b, lists, gate)
                  for b in engine.buckets([len(l) for l in lists], batch, c.bucket)]
  return units


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

  def work(u: DilemmaUnit) -> list[dict]:
    idx, v, cond = u.bucket.rows, u.value, u.cond
    tokens, mask = r.batch([u.lists[i] for i in idx], u.bucket.length, batch)
    g = jnp.asarray(np.pad(applied(cond, u.gate)[idx], (0, batch - len(idx))))
    iv = intervention(r, cond, v, g, ident, edits.get(cond, v), c)
    # perplexity is conditioned on the bare question (no prefix), under the unsteered model
    gen, out, lengths, _ = runner.generate_batch(r, tokens, mask, c, seed=c.seed + u.bucket.index,
                                                 intervene=resolve(r, iv, tokens, mask),
                                                 score=False)
    norms = edit_norms(r, gen.decode_intervention, batch)
    resp_lists = [out[row, :int(lengths[row])].tolist() for row in range(len(idx))]    # own rows; others empty
    ppl = _plain_perplexity(r, [inputs.dilemmas[v][i] for i in idx], resp_lists, c)
    return [dict(_row=row, unit=u.key, kind="dilemma", value=v, condition=cond.name, method=cond.method, prefix=u.prefix,
                 id=inputs.dilemmas[v][i]["id"], **_steering_fields(cond, u.gate[i], norms[row]),
                 response=r.model.tokenizer.decode(resp_lists[row], skip_special_tokens=True),
                 response_tokens=resp_lists[row], perplexity=float(ppl[row]),
                 degenerate=text_metrics.is_degenerate(resp_lists[row]))
            for row, i in r.mine(idx, batch)]

  engine.stream(store, dilemma_units(r, gate_p, ident, inputs, c), work, "dilemmas")


def _plain_perplexity(r: Runner, prompts: list[dict], responses: list[list[int]], c) -> np.ndarray:
  """[N] perplexity of each response under the unsteered model given the bare question (no
  system prompt), so every condition's fluency is measured on the same footing; read at this
  process's own rows (the responses need be right only there)."""
  plists = r.encode(prompts, key="question")
  plen = round_up(max(len(l) for l in plists), c.bucket)
  batch = r.round_batch(c.batch_size)
  pt, pm = r.batch(plists, plen, batch)
  rt, rm = r.batch(responses, c.max_new_tokens, batch, left=False, pad_id=0)    # one response width: one program
  ppl = likelihood.perplexity(r.model.params, r.cfg, pt, pm, rt, rm)
  return r.local(ppl)[:len(prompts)]


# ----------------------------------------------------------------------------- multiple choice

@dataclasses.dataclass(frozen=True, eq=False)
class MCUnit:
  """One batch of the multiple-choice questions dealt to a value, under one condition."""
  key: str
  value: str
  cond: Condition
  questions: list
  bucket: Bucket
  lettered: list         # token lists of the lettered questions (chat-formatted, condition's system prompt)
  bare: list             # token lists of the bare questions
  choices: list          # [N][4] token lists of the option texts (first MC_CHOICE_TOKENS)
  gate: np.ndarray       # [N] 1/0


def mc_units(r: Runner, gate_p: dict, ident: dict, inputs: Inputs, c) -> list[MCUnit]:
  batch = r.round_batch(c.batch_size)
  tok = r.model.tokenizer
  owner = {q["id"]: inputs.values[i % len(inputs.values)] for i, q in enumerate(inputs.mc)}
  units = []
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
      units += [MCUnit(f"mc/{cond.name}/{v}/{b.index}", v, cond, qs, b, lettered, bare, choices, gate)
                for b in engine.buckets([len(l) for l in lettered], batch, c.bucket)]
  return units


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

  def work(u: MCUnit) -> list[dict]:
    idx = u.bucket.rows
    g = jnp.asarray(np.pad(applied(u.cond, u.gate)[idx], (0, batch - len(idx))))
    iv = intervention(r, u.cond, u.value, g, ident, edits.get(u.cond, u.value), c)
    tokens, mask = r.batch([u.lettered[i] for i in idx], u.bucket.length, batch)
    pick = r.local(likelihood.option_logits(r.model.params, r.cfg, tokens, mask, letters,
                                                  resolve(r, iv, tokens, mask))).argmax(-1)
    pick_cloze = _cloze_scores(r, u, iv, batch, c).argmax(-1)
    qs = u.questions
    return [dict(_row=row, unit=u.key, kind="mc", value=u.value, condition=u.cond.name, method=u.cond.method, id=qs[i]["id"],
                 **_steering_fields(u.cond, u.gate[i], 0.0), correct=bool(pick[row] == qs[i]["answer"]),
                 correct_cloze=bool(pick_cloze[row] == qs[i]["answer"])) for row, i in r.mine(idx, batch)]

  engine.stream(store, mc_units(r, gate_p, ident, inputs, c), work, "multiple choice")


def _cloze_scores(r: Runner, u: MCUnit, iv, batch: int, c) -> np.ndarray:
  """[batch, 4] summed log-probability of each option text after the bare question (this
  process's own rows)."""
  idx = u.bucket.rows
  pt, pm = r.batch([u.bare[i] for i in idx], round_up(max(len(u.bare[i]) for i in idx), c.bucket), batch)
  iv = resolve(r, iv, pt, pm)
  cloze = np.zeros((batch, len(schwartz.MC_LETTERS)))
  for k in range(len(schwartz.MC_LETTERS)):
    ct, cm = r.batch([u.choices[i][k] for i in idx], MC_CHOICE_TOKENS, batch, left=False)
    lp = likelihood.response_logprobs(r.model.params, r.cfg, pt, pm, ct, cm, iv)
    cloze[:, k] = r.local(lp).sum(-1)
  return cloze
