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

from jax.sharding import Mesh, PartitionSpec

from valuedist.model.config import ModelConfig
from valuedist.model.partition import DATA
from valuedist.model.sites import site_of
from valuedist.model.params import layout_of
from valuedist.model.transformer import Intervention, forward, init_cache, project

# observe(logits [B, V] f32, taps {name: [B, D] or [L, B, D]}, aux) -> pytree of [B, ...] arrays.
# `aux` is a traced pytree passed through `generate(observe_aux=...)` (e.g. anchor ids), so a
# module-level observer compiles once for every value of it.
Observer = Callable[[jax.Array, dict], Any]


class Generation(NamedTuple):
  tokens: jax.Array        # [B, N] generated ids; pad_id after EOS
  lengths: jax.Array       # [B] generated tokens up to and including EOS
  observed: Any            # observer output stacked per step: leaves [N, B, ...]; steps after EOS are undefined
  decode_intervention: Any = None   # what decode steps applied: `intervene.after_prefill(...)` (or None)


def _order_keys(x: jax.Array) -> jax.Array:
  """int32 keys of f32 values in the same order (the IEEE bits, negatives' magnitude bits flipped)."""
  i = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(i < 0, i ^ jnp.int32(0x7FFFFFFF), i)


def _smallest_key_where(keys: jax.Array, below: Callable[[jax.Array], jax.Array]) -> jax.Array:
  """[B, 1] the smallest t among keys [B, V] with below(t [B, 1]) true, for a predicate that
  is false under every key and turns true once (monotone); bisection over the int32 order,
  32 halvings, each a reduction over V (no sort: a vocabulary split across devices is never
  gathered, only [B] partial reductions cross them)."""
  lo = jnp.min(keys, -1, keepdims=True) - 1          # predicate false here (by the caller's bound)
  hi = jnp.max(keys, -1, keepdims=True)              # and true here

  def halve(_, bounds):
    lo, hi = bounds
    mid = (lo & hi) + ((lo ^ hi) >> 1)               # floor((lo + hi) / 2) without overflow
    ok = below(mid)
    return jnp.where(ok, lo, mid), jnp.where(ok, mid, hi)

  return jax.lax.fori_loop(0, 32, halve, (lo, hi))[1]


def kept(logits: jax.Array, top_k, top_p) -> jax.Array:
  """[B, V] bool: the tokens top-k (0 = off) and top-p (>= 1 = off) filtering keep from
  logits [B, V]: a token is kept when at most top_k - 1 logits exceed it and the probability
  mass of the logits that exceed it is below top_p (ties kept together; the top token always).
  Both cuts are found by bisection over the logits' values with reductions only, so a
  vocabulary split on the model axis is never gathered ([B] partial counts and masses cross
  devices, 32 times per cut, instead of an all-gather of [B, V] for a sort)."""
  v = logits.shape[-1]
  keys = _order_keys(logits)
  lowest = lambda: jnp.min(keys, -1, keepdims=True)
  k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
  kth = jax.lax.cond(k < v, lambda: _smallest_key_where(keys, lambda t: jnp.sum(keys > t, -1, keepdims=True) < k),
                     lowest)
  probs = jax.nn.softmax(logits.astype(jnp.float32), -1)
  p_cut = jax.lax.cond(top_p < 1, lambda: _smallest_key_where(
      keys, lambda t: jnp.sum(jnp.where(keys > t, probs, 0.0), -1, keepdims=True) < top_p), lowest)
  return keys >= jnp.maximum(kth, p_cut)


def choose(logits: jax.Array, key: jax.Array, sample: bool, temperature, top_k, top_p, vocab: int = 0,
           rows: Optional[jax.Array] = None) -> jax.Array:
  """Next tokens [B] from logits [B, V]: argmax, or a sample with temperature, then top-k and
  top-p filtering (`kept`). A sample draws each row's Gumbel noise from its own key,
  fold_in(key, row) with `rows` [B] the rows' indices in the whole batch (default 0..B-1), so a
  row's tokens do not depend on how the batch is split across devices or processes. `vocab`
  < V: the logits are padded past the vocabulary (a model-parallel layout; padded columns
  never win) and noise is drawn for the `vocab` real columns only, so the layout of the
  vocabulary does not matter either."""
  if not sample:
    return jnp.argmax(logits, -1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
  v = logits.shape[-1]
  logits = jnp.where(kept(logits, top_k, top_p), logits, -jnp.inf)
  real = vocab if vocab and vocab < v else v
  rows = jnp.arange(logits.shape[0]) if rows is None else rows
  noise = jax.vmap(lambda r: jax.random.gumbel(jax.random.fold_in(key, r), (real,)))(rows)
  noise = jnp.pad(noise, ((0, 0), (0, v - real)))
  return jnp.argmax(logits + noise, -1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sample", "observe", "observe_taps"))
def generate(params: dict, tokens: jax.Array, mask: jax.Array, cfg: ModelConfig, *,
             max_new_tokens: int, eos_ids: jax.Array | None = None, pad_id: int | jax.Array = 0,
             key: Optional[jax.Array] = None, sample: bool = False, temperature=1.0, top_k=0,
             top_p=1.0, intervene: Optional[Intervention] = None,
             observe: Optional[Observer] = None, observe_aux: Any = None,
             observe_taps: tuple[str, ...] = (), row_ids: Optional[jax.Array] = None) -> Generation:
  """Generates up to `max_new_tokens` for a left-padded batch.

  tokens, mask: [B, T] (mask 1 = token, 0 = left pad). eos_ids: [E] ids that stop a row.
  key: required with `sample` (no hidden default seed); greedy decoding ignores it.
  `intervene` applies at every prefill position; decode steps apply
  `intervene.after_prefill(prefill taps)` (the same intervention unless it decides a fixed
  edit per prompt in prefill, as ConVA does), so the whole steered generation is one program.
  row_ids: [B] int32 the rows' sampling streams (default: their index in the batch); a sweep
  that gives each row a stable id gets the same sample for a row whatever it shares a batch with.
  Returns a `Generation`. The loop ends early once every row has stopped.
  """
  if sample and key is None:
    raise ValueError("sampling needs a PRNG key: pass key=jax.random.PRNGKey(seed)")
  row_ids = jnp.arange(tokens.shape[0], dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
  return _decode(params, tokens, mask, cfg, max_new_tokens, eos_ids, pad_id, key, sample, temperature, top_k, top_p,
                 intervene, observe, observe_aux, observe_taps, row_ids)


def _decode(params, tokens, mask, cfg, max_new_tokens, eos_ids, pad_id, key, sample, temperature, top_k, top_p,
            intervene, observe, observe_aux, observe_taps, row_ids) -> Generation:
  """The body of `generate` for the rows of a batch whose sampling streams are row_ids [B]."""
  b, t = tokens.shape
  n = max_new_tokens
  key = jax.random.PRNGKey(0) if key is None else key          # greedy decoding never reads it
  eos_ids = jnp.zeros((0,), jnp.int32) if eos_ids is None else jnp.asarray(eos_ids, jnp.int32)
  cache = init_cache(cfg, b, t + n, per_layer=layout_of(params) == "unstacked")
  prefill_taps = tuple(dict.fromkeys(observe_taps + (intervene.prefill_taps if intervene else ())))
  prompt_len = jnp.sum(mask, -1).astype(jnp.int32)             # [B]
  # Only the last token's logits are needed: unless a tap asks for all of them, project the
  # last token's normed state alone (not all B x T positions).
  full = "logits" in {site_of(n) for n in prefill_taps}
  logits, cache, taps = forward(params, tokens, cfg, attention_mask=mask, cache=cache, logits=full,
                                taps=prefill_taps if full else tuple(dict.fromkeys(prefill_taps + ("final_normed",))),
                                tap_last=True, intervene=intervene, prompt_len=prompt_len)
  logits = logits[:, -1] if full else project(params, taps["final_normed"][:, None], cfg, intervene,
                                              (prompt_len - 1)[:, None], mask[:, -1:], prompt_len)[:, 0]
  decode_iv = intervene.after_prefill(taps) if intervene is not None else None
  taps = {k: taps[k] for k in observe_taps}
  next_pos = prompt_len[:, None]                                # [B, 1]

  observe_fn = functools.partial(observe or (lambda lg, tp, aux: ()), aux=observe_aux)
  obs_shape = jax.eval_shape(observe_fn, logits, taps)
  observed = jax.tree.map(lambda s: jnp.zeros((n,) + s.shape, s.dtype), obs_shape)

  def cond(c):
    i, done = c[0], c[5]
    return (i < n) & ~jnp.all(done)

  def body(c):
    i, logits, taps, cache, pos, done, out, lengths, observed, key = c
    key, sub = jax.random.split(key)
    tok = choose(logits, sub, sample, temperature, top_k, top_p, cfg.vocab_size, row_ids)
    tok = jnp.where(done, pad_id, tok)
    observed = jax.tree.map(lambda buf, o: buf.at[i].set(o), observed, observe_fn(logits, taps))
    out = out.at[:, i].set(tok)
    lengths = lengths + (~done).astype(jnp.int32)
    done = done | jnp.isin(tok, eos_ids)
    logits, cache, taps = forward(params, tok[:, None], cfg, positions=pos, cache=cache,
                                  attention_mask=jnp.ones((b, 1), jnp.int32),
                                  taps=observe_taps, tap_last=True, intervene=decode_iv,
                                  step=i + 1, prompt_len=prompt_len)
    return (i + 1, logits[:, -1], taps, cache, pos + 1, done, out, lengths, observed, key)

  out = jnp.full((b, n), pad_id, jnp.int32)
  init = (jnp.zeros((), jnp.int32), logits, taps, cache, next_pos, jnp.zeros((b,), bool), out,
          jnp.zeros((b,), jnp.int32), observed, key)
  c = jax.lax.while_loop(cond, body, init)
  return Generation(c[6], c[7], c[8], decode_iv)


@functools.partial(jax.jit, static_argnames=("cfg", "mesh", "max_new_tokens", "sample", "observe", "observe_taps"))
def generate_data_parallel(params: dict, tokens: jax.Array, mask: jax.Array, cfg: ModelConfig, *, mesh: Mesh,
                           max_new_tokens: int, eos_ids: jax.Array | None = None, pad_id: int | jax.Array = 0,
                           key: Optional[jax.Array] = None, sample: bool = False, temperature=1.0, top_k=0,
                           top_p=1.0, intervene: Optional[Intervention] = None,
                           observe: Optional[Observer] = None, observe_aux: Any = None,
                           observe_taps: tuple[str, ...] = (), row_ids: Optional[jax.Array] = None) -> Generation:
  """`generate` with the rows split on the mesh's `data` axis by `shard_map`: each data shard
  runs its own prefill and decode loop over its own rows and stops when they are done, so no
  decode step meets the other data shards (no collective across `data`; the params stay as
  placed, split on `model` by the compiler inside each shard). The same tokens as `generate`
  (greedy bitwise; samples by row keys, `choose`). tokens, mask [B, T] with B a multiple of
  mesh.shape['data']; interventions split their per-row fields with the rows
  (`Intervention.row_specs`); observer outputs [N, B, ...] are split on B, and entries after a
  row stopped are undefined as in `generate` (a shard that stops early leaves zeros)."""
  if sample and key is None:
    raise ValueError("sampling needs a PRNG key: pass key=jax.random.PRNGKey(seed)")
  b = tokens.shape[0]
  n_data = mesh.shape[DATA]
  if b % n_data:
    raise ValueError(f"a batch of {b} rows does not split across {n_data} data shards; pad it to a multiple")
  key = jax.random.PRNGKey(0) if key is None else key
  eos_ids = jnp.zeros((0,), jnp.int32) if eos_ids is None else jnp.asarray(eos_ids, jnp.int32)
  row_ids = jnp.arange(b, dtype=jnp.int32) if row_ids is None else jnp.asarray(row_ids, jnp.int32)
  knobs = (jnp.asarray(pad_id), key, jnp.asarray(temperature), jnp.asarray(top_k), jnp.asarray(top_p))

  def decode_rows(row_ids, params, tokens, mask, eos_ids, knobs, intervene, observe_aux):
    pad, k, temp, tk, tp = knobs
    return _decode(params, tokens, mask, cfg, max_new_tokens, eos_ids, pad, k, sample, temp, tk, tp,
                   intervene, observe, observe_aux, observe_taps, row_ids)

  rows, same = PartitionSpec(DATA), PartitionSpec()
  local = jax.ShapeDtypeStruct((b // n_data,) + tokens.shape[1:], tokens.dtype)
  local_iv = None if intervene is None else jax.tree.map(
      lambda x, spec: jax.ShapeDtypeStruct((x.shape[0] // n_data,) + x.shape[1:] if spec == rows else x.shape, x.dtype),
      intervene, intervene.row_specs())
  local_ids = jax.ShapeDtypeStruct((b // n_data,), jnp.int32)
  shapes = jax.eval_shape(decode_rows, local_ids, params, local, local, eos_ids, knobs, local_iv, observe_aux)
  out_specs = Generation(rows, rows, jax.tree.map(lambda _: PartitionSpec(None, DATA), shapes.observed),
                         None if shapes.decode_intervention is None else shapes.decode_intervention.row_specs())
  in_specs = (rows, jax.tree.map(lambda _: same, params), rows, rows, same, same,
              None if intervene is None else intervene.row_specs(), jax.tree.map(lambda _: same, observe_aux))
  mapped = jax.shard_map(decode_rows, mesh=mesh, in_specs=in_specs, out_specs=out_specs, axis_names={DATA},
                         check_vma=False)
  return mapped(row_ids, params, tokens, mask, eos_ids, knobs, intervene, observe_aux)

