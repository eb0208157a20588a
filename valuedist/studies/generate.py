"""Generates from each model with the jitted KV-cache sampler and prints, for every step,
the chosen token and the top logits of its distribution."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from valuedist import checkpoints
from valuedist.checkpoints.tokenizer import encode_prompt
from valuedist.model import sampler
from valuedist.model.batching import pack_left


def top_logits(logits: jax.Array, taps: dict, aux) -> dict[str, jax.Array]:
  """Observer: the 8 highest logits and their ids at each step, [B, 8]."""
  values, ids = jax.lax.top_k(logits, 8)
  return {"values": values, "ids": ids}


def run(c) -> None:
  prompts = [p for p in c.prompts.split("|") if p.strip()]
  if not prompts:
    raise ValueError("config.prompts is empty; give '|'-separated prompts")
  for spec in [s.strip() for s in c.models.split(",") if s.strip()]:
    m = checkpoints.load(spec, dtype=jnp.dtype(c.dtype), cache_dir=c.cache_dir or None, layout=c.layout)
    lists = [encode_prompt(m.tokenizer, p, chat=True) for p in prompts]
    length = max(len(l) for l in lists)
    tokens, mask = pack_left(lists, length, len(lists), m.pad_id)
    g = sampler.generate(m.params, jnp.asarray(tokens), jnp.asarray(mask), m.cfg, max_new_tokens=c.max_new_tokens,
                         eos_ids=jnp.asarray(m.eos_ids, jnp.int32), pad_id=m.pad_id, observe=top_logits)
    ids, vals, lengths = np.asarray(g.observed["ids"]), np.asarray(g.observed["values"]), np.asarray(g.lengths)
    print(f"=== {m.name} ({m.cfg.family}, {m.cfg.n_layers} layers, aligned={m.aligned})")
    for row, prompt in enumerate(prompts):
      text = m.tokenizer.decode(np.asarray(g.tokens[row, :lengths[row]]).tolist(), skip_special_tokens=True)
      print(f"--- prompt: {prompt!r}\n    answer: {text!r}")
      for t in range(int(lengths[row])):
        tops = ", ".join(f"{m.tokenizer.decode([int(i)])!r}:{v:.2f}" for i, v in zip(ids[t, row, :c.top], vals[t, row, :c.top]))
        print(f"    step {t:2d}: {tops}")
