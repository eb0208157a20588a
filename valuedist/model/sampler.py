"""KV-cache generation: one prefill, then a `jax.lax.while_loop` of jitted decode steps.

Batches are left padded; positions come from the mask so every row equals its unbatched
run. Sampling knobs (temperature, top-k, top-p) and interventions are traced, so sweeps
reuse one compiled program; only shapes and `sample` (greedy or not) are static.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from valuedist.model.config import ModelConfig
from valuedist.model.transformer import Intervention, forward, init_cache

# observe(logits [B, V] f32, taps {name: [B, D] or [L, B, D]}, aux) -> pytree of [B, ...] arrays.
# `aux` is a traced pytree passed through `generate(observe_aux=...)` (e.g. anchor ids), so a
# module-level observer compiles once for every value of it.
Observer = Callable[[jax.Array, dict], Any]


class Generation(NamedTuple):
  tokens: jax.Array        # [B, N] generated ids; pad_id after EOS
  lengths: jax.Array       # [B] generated tokens up to and including EOS
  observed: Any            # observer output stacked per step: leaves [N, B, ...]; steps after EOS are undefined
  decode_intervention: Any = None   # what decode steps applied: `intervene.after_prefill(...)` (or None)


def choose(logits: jax.Array, key: jax.Array, sample: bool, temperature, top_k, top_p, vocab: int = 0) -> jax.Array:
  """Next tokens [B] from logits [B, V]: argmax, or a sample with temperature, top-k (0 = off)
  and top-p (1 = off) filtering. `vocab` < V: the logits are padded past the vocabulary (a
  model-parallel layout; padded columns never win) and the sample's Gumbel noise is drawn
  for the `vocab` real columns only, so a key gives the same tokens on any layout."""
  if not sample:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits / jnp.maximum(temperature, 1e-6)
  sorted_logits = jnp.sort(logits, -1)[:, ::-1]
  v = logits.shape[-1]
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth = jnp.take_along_axis(sorted_logits, jnp.full((logits.shape[0], 1), k - 1), -1)
  probs = jax.nn.softmax(sorted_logits, -1)
  before = jnp.cumsum(probs, -1) - probs            # mass strictly above each sorted token
  keep_sorted = before < top_p                      # always keeps the top token
  p_cut = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), -1, keepdims=True)
  cut = jnp.maximum(kth, p_cut)
  logits = jnp.where(logits >= cut, logits, -jnp.inf)
  if not vocab or vocab >= v:
    return jax.random.categorical(key, logits, -1).astype(jnp.int32)
  noise = jax.random.gumbel(key, logits.shape[:-1] + (vocab,))       # what categorical draws for [B, vocab]
  noise = jnp.pad(noise, ((0, 0), (0, v - vocab)))
  return jnp.argmax(logits + noise, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sample", "observe", "observe_taps"))
def generate(params: dict, tokens: jax.Array, mask: jax.Array, cfg: ModelConfig, *,
             max_new_tokens: int, eos_ids: jax.Array | None = None, pad_id: int | jax.Array = 0,
             key: Optional[jax.Array] = None, sample: bool = False, temperature=1.0, top_k=0,
             top_p=1.0, intervene: Optional[Intervention] = None,
             observe: Optional[Observer] = None, observe_aux: Any = None,
             observe_taps: tuple[str, ...] = ()) -> Generation:
  """Generates up to `max_new_tokens` for a left-padded batch.

  tokens, mask: [B, T] (mask 1 = token, 0 = left pad). eos_ids: [E] ids that stop a row.
  key: required with `sample` (no hidden default seed); greedy decoding ignores it.
  `intervene` applies at every prefill position; decode steps apply
  `intervene.after_prefill(prefill taps)` (the same intervention unless it decides a fixed
  edit per prompt in prefill, as ConVA does), so the whole steered generation is one program.
  Returns a `Generation`. The loop ends early once every row has stopped.
  """
  b, t = tokens.shape
  n = max_new_tokens
  if sample and key is None:
    raise ValueError("sampling needs a PRNG key: pass key=jax.random.PRNGKey(seed)")
  key = jax.random.PRNGKey(0) if key is None else key          # greedy decoding never reads it
  eos_ids = jnp.zeros((0,), jnp.int32) if eos_ids is None else jnp.asarray(eos_ids, jnp.int32)
  cache = init_cache(cfg, b, t + n)
  prefill_taps = tuple(dict.fromkeys(observe_taps + (intervene.prefill_taps if intervene else ())))
  logits, cache, taps = forward(params, tokens, cfg, attention_mask=mask, cache=cache,
                                taps=prefill_taps, tap_last=True, intervene=intervene)
  logits = logits[:, -1]
  decode_iv = intervene.after_prefill(taps) if intervene is not None else None
  taps = {k: taps[k] for k in observe_taps}
  next_pos = jnp.sum(mask, -1).astype(jnp.int32)[:, None]       # [B, 1]

  observe_fn = functools.partial(observe or (lambda lg, tp, aux: ()), aux=observe_aux)
  obs_shape = jax.eval_shape(observe_fn, logits, taps)
  observed = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape, s.dtype), obs_shape)

  def cond(c):
    i, done = c[0], c[5]
    return (i < n) & ~jnp.all(done)

  def body(c):
    i, logits, taps, cache, pos, done, out, lengths, observed, key = c
    key, sub = jax.random.split(key)
    tok = choose(logits, sub, sample, temperature, top_k, top_p, cfg.vocab_size)
    tok = jnp.where(done, pad_id, tok)
    observed = jax.tree.map(lambda buf, o: buf.at[i].set(o), observed, observe_fn(logits, taps))
    out = out.at[:, i].set(tok)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, eos_ids)
    logits, cache, taps = forward(params, tok[:, None], cfg, positions=pos, cache=cache,
                                  attention_mask=jnp.ones((b, 1), jnp.int32),
                                  taps=observe_taps, tap_last=True, intervene=decode_iv)
    return (i + 1, logits[:, -1], taps, cache, pos + 1, done, out, lengths, observed, key)

  out = jnp.full((b, n), pad_id, jnp.int32)
  init = (jnp.zeros((), jnp.int32), logits, taps, cache, next_pos, jnp.zeros((b,), bool), out,
          jnp.zeros((b,), jnp.int32), observed, key)
  c = jax.lax.while_loop(cond, body, init)
  return Generation(c[6], c[7], c[8], decode_iv)
