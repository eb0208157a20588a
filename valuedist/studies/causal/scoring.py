"""Questionnaire scoring under system prompts (roles) and interventions: expected answers from
the option tokens '1'..'6' at the answer position and each prompt's option mass (the total
probability on those tokens there), one streamed unit per batch, keyed by a fingerprint of
everything it depends on (STUDY_PROTOCOL rule 12)."""
from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from valuedist.checkpoints.tokenizer import check_lengths
from valuedist.eval import likelihood
from valuedist.studies import engine
from valuedist.studies.causal.inputs import Inputs
from valuedist.studies.engine import ResultStore, keyed
from valuedist.studies.runner import Runner, model_identity
from valuedist.values import questionnaire

# How a record is read out of the option logits; part of every unit's fingerprint, so records
# of an older readout (no 'mass') are recomputed, never mixed in.
READOUT = "option log-probs (full-vocabulary log_softmax) -> expected answer + option mass"


def option_ids_of(r: Runner) -> jnp.ndarray:
  """[6, S] token ids of the options '1'..'6' (surface forms; -1 = unused) in r's vocabulary."""
  return jnp.asarray(likelihood.option_token_ids(r.model.tokenizer, questionnaire.OPTIONS))


def scoring_inputs(r: Runner, inputs: Inputs, c, systems: Sequence, lists: Sequence[Sequence[int]]) -> tuple:
  """What every questionnaire score of r depends on besides its intervention, as fingerprint
  parts (`engine.keyed`): the model, the system prompts, the items, their tokens `lists`, the
  option ids, the batching and the readout; the leading parts of each scoring key
  (`score_prompts`, `sae.steering_table`)."""
  return (model_identity(r), list(systems), [[it["id"], it["value"], it["text"]] for it in inputs.items],
          [list(l) for l in lists], np.asarray(option_ids_of(r)), r.round_batch(c.batch_size), c.bucket, READOUT)


def score_prompts(store: ResultStore, r: Runner, inputs: Inputs, c, *, tag: str, systems: Sequence,
                  depends: Sequence = (), with_mass: bool = False):
  """Expected answers [S, I] of every item under each system prompt (None = no role),
  streamed per batch under unit keys '<tag>#<fingerprint>/<batch>'; reused when already in
  the store. Each record also holds the prompt's option mass ('mass': probability on '1'..'6'
  at the answer position, in [0, 1]); with_mass=True returns (scores, mass [S, I]). The
  fingerprint covers the model, system prompts, items, their tokens, option ids, batching, the
  readout and `depends` (anything else the caller's scores depend on), so records of other
  inputs are never mixed in."""
  option_ids = option_ids_of(r)
  lists, where = item_tokens(r, inputs, systems, tag)
  batch = r.round_batch(c.batch_size)
  prefix = keyed(tag, *scoring_inputs(r, inputs, c, systems, lists), list(depends))

  def work(u: engine.BatchUnit) -> list[dict]:
    idx = u.bucket.rows
    tokens, mask = r.batch([lists[i] for i in idx], u.bucket.length, batch)
    z = likelihood.option_logits(r.model.params, r.cfg, tokens, mask, option_ids, log_probs=True)
    e, m = r.local((questionnaire.expected_scores(z), questionnaire.option_mass(z)))
    return [dict(_row=k, unit=u.key, row=int(where[i][0]), item=inputs.items[where[i][1]]["id"], score=float(e[k]),
                 mass=float(m[k])) for k, i in r.mine(idx, batch)]

  engine.stream(store, engine.batch_units(prefix, [len(l) for l in lists], batch, c.bucket), work, f"scores {tag}")
  out, mass = np.full((2, len(systems), len(inputs.items)), np.nan)
  col = {it["id"]: j for j, it in enumerate(inputs.items)}
  for rec in store.records():
    if rec["unit"].rsplit("/", 1)[0] == prefix:
      out[rec["row"], col[rec["item"]]] = rec["score"]
      mass[rec["row"], col[rec["item"]]] = rec["mass"]
  return (out, mass) if with_mass else out


def item_tokens(r: Runner, inputs: Inputs, systems: Sequence = (None,), tag: str = "items"
                ) -> tuple[list[list[int]], list[tuple[int, int]]]:
  """Every questionnaire item's prompt under each system prompt (None = no role), tokenised,
  lengths checked (errors name '<tag>:<system index>:<item id>'): (token lists, the (system
  index, item index) of each)."""
  prompts = [{"prompt": questionnaire.item_prompt(it)} for it in inputs.items]
  lists, where = [], []
  for s, system in enumerate(systems):
    lists += r.encode(prompts, system)
    where += [(s, i) for i in range(len(prompts))]
  check_lengths(lists, [f"{tag}:{s}:{inputs.items[i]['id']}" for s, i in where], r.cfg.max_positions)
  return lists, where


def role_scores(store: ResultStore, r: Runner, inputs: Inputs, c, with_mass: bool = False):
  """The study's unsteered scoring: every item with no role (row 0) and under each role, tag
  'roles'; [1 + roles, I] (and the option mass, as in `score_prompts`)."""
  return score_prompts(store, r, inputs, c, tag="roles", systems=[None] + [ro["role"] for ro in inputs.roles],
                       with_mass=with_mass)


def mass_stats(mass: np.ndarray, items: Sequence[dict]) -> dict:
  """Option mass [..., I] of some prompts -> {'mean', 'min', 'n', 'lowest_item'} over them all
  (denominator: every prompt scored under the condition)."""
  m = np.asarray(mass, np.float64)
  j = np.unravel_index(np.nanargmin(m), m.shape)[-1]
  return {"mean": float(np.nanmean(m)), "min": float(np.nanmin(m)), "n": int(np.isfinite(m).sum()),
          "lowest_item": items[int(j)]["id"]}
