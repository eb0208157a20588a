"""The causal study's sparse-autoencoder part: the corpus (shipped texts plus the model's own
answers), residual activations without attention sinks, the SAE (trained, resumed or
loaded) and its quality, each value's feature from the minimal pairs, and steering by it."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from valuedist.data import schwartz
from valuedist.model import sampler, transformer
from valuedist.studies import engine
from valuedist.studies.causal.inputs import VALUES, Inputs
from valuedist.studies.causal.report import named
from valuedist.studies.causal.scoring import score_prompts
from valuedist.studies.engine import digest, keyed
from valuedist.studies.runner import model_identity
from valuedist.studies.engine import ResultStore
from valuedist.studies.runner import Runner
from valuedist.values import causal_graph, questionnaire, sae as sae_lib


def corpus(inputs: Inputs) -> list[str]:
  """The text of the SAE corpus: prompts, dilemmas, minimal-pair sentences and roles."""
  texts = [p["prompt"] for p in inputs.prompts] + [d["question"] for d in inputs.dilemmas]
  for v in VALUES:
    for p in schwartz.value_pairs(v, scenarios=inputs.scenarios):
      texts += [p.positive, p.negative]
  return texts + [r["role"] for r in inputs.roles]


def corpus_tokens(store: ResultStore, r: Runner, inputs: Inputs, c) -> list[list[int]]:
  """The SAE training corpus as token lists: the `corpus` texts (plain, first
  c.sae.max_tokens tokens each) plus the model's own greedy answers to the prompts
  (chat-formatted prompt + answer, c.sae.corpus_new_tokens new tokens; 0 = none), which are
  generated once, streamed to the store under 'corpus#<fingerprint>/<batch>' and reused on a
  rerun while the model, the prompts' tokens, the answer length and the batching are unchanged."""
  tok = r.model.tokenizer
  lists = [list(tok(t)["input_ids"])[:c.sae.max_tokens] for t in corpus(inputs)]
  n_new = c.sae.corpus_new_tokens
  if not n_new:
    return lists
  prompts = inputs.prompts
  plists = r.encode(prompts)
  batch = r.round_batch(c.batch_size)
  eos = jnp.asarray(r.model.eos_ids, jnp.int32)
  prefix = keyed("corpus", model_identity(r), [p["id"] for p in prompts], plists, n_new, list(r.model.eos_ids),
                 r.model.pad_id, batch, c.bucket)

  def work(u: engine.BatchUnit) -> list[dict]:
    idx = u.bucket.rows
    tokens, mask = r.batch([plists[i] for i in idx], u.bucket.length, batch)
    g = sampler.generate(r.model.params, tokens, mask, r.cfg, max_new_tokens=n_new, eos_ids=eos,
                         pad_id=r.model.pad_id)
    out, n = np.asarray(g.tokens), np.asarray(g.lengths)
    return [dict(unit=u.key, id=prompts[i]["id"], index=int(i), tokens=plists[i] + out[row, :int(n[row])].tolist())
            for row, i in enumerate(idx)]

  engine.stream(store, engine.batch_units(prefix, [len(l) for l in plists], batch, c.bucket), work,
                "SAE corpus: own answers")
  own = {rec["index"]: rec["tokens"] for rec in store.records() if rec["unit"].startswith(prefix + "/")}
  return lists + [own[i] for i in range(len(prompts))]           # in prompt order, however the units ran


def token_activations(r: Runner, lists: Sequence[Sequence[int]], layer: int, batch: int) -> list[np.ndarray]:
  """Residual stream after block `layer` at every real token of each token list but the
  first (and any BOS): one f32 [n_i, D] array per list.

  The first position is an attention sink whether or not it is a BOS token: in
  smollm2-135m-instruct, whose tokenizer adds no BOS, its residual norm at block 15 is ~22000
  against ~185 elsewhere, and kept in, it made the SAE's explained variance ~1.0 by itself and
  the mean residual norm (the unit of 'add' steering) 4x too large."""
  batch = r.round_batch(batch)
  out = [None] * len(lists)
  for b in engine.progress(engine.buckets([len(l) for l in lists], batch), "SAE activations"):
    idx = b.rows
    tokens, mask = r.batch([lists[i] for i in idx], b.length, batch)
    h = np.asarray(sae_lib.layer_activations(r.model.params, tokens, mask, r.cfg, layer))
    m = not_sink_mask(np.asarray(tokens), np.asarray(mask), r.model.bos_id)
    for row, i in enumerate(idx):
      out[i] = h[row][m[row]]
  return out


def not_sink_mask(tokens: np.ndarray, mask: np.ndarray, bos_id) -> np.ndarray:
  """[B, T] bool: real tokens of a left-padded batch except each row's first one and any BOS."""
  m = mask.astype(bool)
  m[np.arange(len(m)), np.argmax(m, axis=1)] = False               # first real position (all-pad rows: none)
  if bos_id is not None:
    m &= tokens != bos_id
  return m


def sae_fingerprint(r: Runner, lists: Sequence[Sequence[int]], c, layer: int, loaded=None) -> str:
  """sha256 hex of what the SAE, its quality, the residual norm and the latents' active
  values depend on: the model, the corpus tokens, the layer, the seed (held-out split) and
  either the training knobs (width, k, steps, batch, lr) or the loaded SAE's arrays."""
  how = (["file", sae_lib.sae_digest(loaded)] if loaded is not None else
         ["train", c.sae.width, c.sae.k, c.sae.steps, c.sae.batch, c.sae.lr])
  return digest("sae", model_identity(r), [list(l) for l in lists], layer, c.seed, how)


def get_sae(store: ResultStore, r: Runner, inputs: Inputs, c, out: Path, layer: int):
  """(SAE, fingerprint, quality dict, mean residual norm at the layer, [F] latents' mean
  active values). Loads c.sae.path, else out/sae.npz when it was saved with the same
  `sae_fingerprint`, else trains (resumable) on the corpus and saves sae.npz with it. Quality
  is measured on the activations of 10% of the corpus's sequences, held out from training."""
  lists = corpus_tokens(store, r, inputs, c)
  per_seq = token_activations(r, lists, layer, c.batch_size)
  held_seq = np.random.default_rng(c.seed).random(len(per_seq)) < 0.1
  train_acts = np.concatenate([a for a, h in zip(per_seq, held_seq) if not h])
  held_acts = np.concatenate([a for a, h in zip(per_seq, held_seq) if h])
  if c.sae.path:
    s = sae_lib.check_width(sae_lib.load_sae(c.sae.path, c.sae.kind or None, c.sae.k), r.cfg.d_model, layer)
    fp = sae_fingerprint(r, lists, c, layer, loaded=s)
  else:
    fp = sae_fingerprint(r, lists, c, layer)
    if sae_lib.saved_fingerprint(out / "sae.npz") == fp:
      s = sae_lib.load_sae(out / "sae.npz")
    else:
      s = sae_lib.train(train_acts, width=c.sae.width, k=c.sae.k, steps=c.sae.steps, batch=c.sae.batch,
                        lr=c.sae.lr, seed=c.seed, ckpt_dir=out / "sae_ckpt", ckpt_every=c.sae.ckpt_every)
      sae_lib.save_sae(out / "sae.npz", s, fp)
  q = sae_lib.quality(s, held_acts)
  q.update(layer=layer, train_rows=len(train_acts), sequences=len(per_seq))
  return s, fp, q, float(np.linalg.norm(train_acts, axis=-1).mean()), sae_lib.active_means(s, held_acts)


def value_feature_table(r: Runner, s, inputs: Inputs, layer: int, c) -> dict:
  """{value: [(latent, score)...]}: latents separating the two sides of the value's pairs
  (last-token activations at the SAE's layer)."""
  feats = {}
  for v in VALUES:
    pairs = schwartz.value_pairs(v, scenarios=inputs.scenarios)
    acts = r.last_token_activations([p.positive for p in pairs] + [p.negative for p in pairs], c.batch_size)[layer]
    feats[v] = sae_lib.value_features(s, acts[:len(pairs)], acts[len(pairs):], top=c.sae.top_features)
  return feats


def sae_steering(sae, latent: int, layer: int, coef: float, n_layers: int, norm: float, active: np.ndarray,
                 mode: str):
  """(intervention, absolute strength) for one latent at one layer. 'add': the latent's
  decoder direction times coef x the layer's mean residual norm; 'clamp': the latent set to
  coef x its mean active value at every position (coef 0 ablates it)."""
  if mode == "add":
    scale = coef * norm
    return transformer.AddToResidual(sae_lib.steering_vectors(sae, latent, layer, n_layers),
                               jnp.asarray(scale, jnp.float32)), scale
  value = coef * float(active[latent])
  return sae_lib.ClampLatent(sae, jnp.asarray(latent), jnp.asarray(layer), jnp.asarray(value, jnp.float32)), value


def sae_part(store: ResultStore, r: Runner, inputs: Inputs, c, out: Path, layer: int, items: np.ndarray,
             g: np.ndarray) -> dict:
  """The SAE, its value features and, per value and coefficient, the change of all value
  scores (no role) when steering by the value's top feature, against the unsteered scores
  `items` [1 + roles, I] row 0; side effects judged against graph g. Steering units are keyed
  by the SAE's fingerprint and weights, layer, mode, latent and coefficient (and, in
  `score_prompts`, the model and items)."""
  sae, fp, q, norm, active = get_sae(store, r, inputs, c, out, layer)
  weights = sae_lib.sae_digest(sae)
  feats = value_feature_table(r, sae, inputs, layer, c)
  iv = [it["value"] for it in inputs.items]
  steering = []
  for t, v in enumerate(VALUES):
    latent = feats[v][0][0]
    for coef in c.sae.coefs:
      iv_sae, scale = sae_steering(sae, latent, layer, float(coef), r.cfg.n_layers, norm, active, c.sae.mode)
      it = score_prompts(store, r, inputs, c, tag=f"sae-{c.sae.mode}/{v}/{latent}/{coef:g}", systems=[None],
                         intervene=iv_sae, depends=[fp, weights, layer, c.sae.mode, v, latent, float(coef)])
      d = (questionnaire.value_scores(it, iv) - questionnaire.value_scores(items[:1], iv))[0]
      steering.append(dict(named(causal_graph.side_effects(d, t, g, c.side_effect_threshold)), target=v,
                           latent=latent, coef=float(coef), scale=scale, delta=np.round(d, 4).tolist()))
  return {"quality": q, "fingerprint": fp[:12], "mean_residual_norm": norm, "mode": c.sae.mode, "features": feats,
          "steering": steering}
