"""Questionnaire scoring under system prompts (roles) and interventions: expected answers from
the option tokens '1'..'6' at the answer position, one streamed unit per batch, keyed by a
fingerprint of everything it depends on (STUDY_PROTOCOL rule 12)."""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from valuedist.checkpoints.tokenizer import check_lengths
from valuedist.eval import likelihood
from valuedist.studies import engine
from valuedist.studies.causal.inputs import Inputs
from valuedist.studies.engine import ResultStore, keyed
from valuedist.studies.runner import Runner, model_identity
from valuedist.values import questionnaire


def score_prompts(store: ResultStore, r: Runner, inputs: Inputs, c, *, tag: str, systems: Sequence,
                  intervene=None, depends: Sequence = ()) -> np.ndarray:
  """Expected answers [S, I] of every item under each system prompt (None = no role),
  streamed per batch under unit keys '<tag>#<fingerprint>/<batch>'; reused when already in
  the store. The fingerprint covers the model, system prompts, items, their tokens, option
  ids, batching and `depends` (what the caller's intervention depends on), so records of
  other inputs are never mixed in."""
  option_ids = jnp.asarray(likelihood.option_token_ids(r.model.tokenizer, questionnaire.OPTIONS))
  prompts = [{"prompt": questionnaire.item_prompt(it)} for it in inputs.items]
  lists, where = [], []
  for s, system in enumerate(systems):
    lists += r.encode(prompts, system)
    where += [(s, i) for i in range(len(prompts))]
  check_lengths(lists, [f"{tag}:{s}:{inputs.items[i]['id']}" for s, i in where], r.cfg.max_positions)
  batch = r.round_batch(c.batch_size)
  prefix = keyed(tag, model_identity(r), list(systems), [[it["id"], it["value"], it["text"]] for it in inputs.items],
                 lists, np.asarray(option_ids), batch, c.bucket, list(depends))

  def work(u: engine.BatchUnit) -> list[dict]:
    idx = u.bucket.rows
    tokens, mask = r.batch([lists[i] for i in idx], u.bucket.length, batch)
    z = likelihood.option_logits(r.model.params, r.cfg, tokens, mask, option_ids, intervene)
    e = np.asarray(questionnaire.expected_scores(z))
    return [dict(unit=u.key, row=int(where[i][0]), item=inputs.items[where[i][1]]["id"], score=float(e[k]))
            for k, i in enumerate(idx)]

  engine.stream(store, engine.batch_units(prefix, [len(l) for l in lists], batch, c.bucket), work, f"scores {tag}")
  out = np.full((len(systems), len(inputs.items)), np.nan)
  col = {it["id"]: j for j, it in enumerate(inputs.items)}
  for rec in store.records():
    if rec["unit"].rsplit("/", 1)[0] == prefix:
      out[rec["row"], col[rec["item"]]] = rec["score"]
  return out
