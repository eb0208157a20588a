"""The causal study's sparse-autoencoder part: the corpus (shipped texts plus the model's own
answers), residual activations without attention sinks, the SAE (trained, resumed or
loaded) and its quality, each value's feature chosen on a training split of the minimal pairs
and checked on held-out pairs, and a dose-response sweep of steering by it beside two
controls run through the same program at every coefficient (STUDY_PROTOCOL rules 1, 7, 8):

  feature            the value's top latent (decoder direction, or clamped activation)
  random_latent      a seeded random latent, not among the value's chosen features, same recipe
  random_direction   a seeded random unit direction (`values.controls`) with the feature's edit
                     norm at the same layer and positions

The sweep is one table of rows (condition x item) sharing batches (`steering_table`). Each
row's record names its condition, 'sae-<mode>/<value>/<latent>/<coef>#<fp>' (feature),
'control-latent-<mode>/<value>/<latent>/<coef>#...' or 'control-direction-<mode>/<value>/<coef>#...',
fingerprinted by the SAE, layer, mode, positions, latent, coefficient, absolute strength and
(direction) the control vector's digest, on top of every score's own inputs
(`scoring.scoring_inputs`), so a changed input is recomputed and an unchanged row reused."""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from valuedist.data import schwartz
from valuedist.eval import likelihood, stats
from valuedist.model import edits, sampler, transformer
from valuedist.parallel import hosts
from valuedist.studies import engine, tables
from valuedist.studies.causal.inputs import STEERED_SPANS, VALUES, Inputs
from valuedist.studies.causal.report import named, plot_dose_response
from valuedist.studies.causal.scoring import item_tokens, mass_stats, option_ids_of, role_scores, scoring_inputs
from valuedist.studies.engine import ResultStore, digest, keyed
from valuedist.studies.runner import Runner, model_identity
from valuedist.values import causal_graph, controls, questionnaire, sae as sae_lib, sae_training

KINDS = ("feature", "random_latent", "random_direction")
SPLIT_STREAM, LATENT_STREAM = 0x5B17, 0x1A7E    # seed streams of the pair split and the random latents


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
    g = sampler.generate_data_parallel(r.model.params, tokens, mask, r.cfg, mesh=r.mesh, max_new_tokens=n_new,
                                       eos_ids=eos, pad_id=r.model.pad_id)
    out, n = r.local((g.tokens, g.lengths))
    return [dict(_row=row, unit=u.key, id=prompts[i]["id"], index=int(i), tokens=plists[i] + out[row, :int(n[row])].tolist())
            for row, i in r.mine(idx, batch)]

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
  the residual norm (the unit of 'add' steering) 4x too large."""
  batch = r.round_batch(batch)
  out = [None] * len(lists)
  for b in engine.progress(engine.buckets([len(l) for l in lists], batch), "SAE activations"):
    idx = b.rows
    tokens, mask = r.batch([lists[i] for i in idx], b.length, batch)
    h = hosts.to_host(sae_lib.layer_activations(r.model.params, tokens, mask, r.cfg, layer))
    m = not_sink_mask(hosts.to_host(tokens), hosts.to_host(mask), r.model.bos_id)
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
  """(SAE, fingerprint, quality dict, residual norms {'median', 'mean'} at the layer over the
  training rows (attention sinks excluded, see `token_activations`), [F] latents' mean active
  values). Loads c.sae.path, else out/sae.npz when it was saved with the same
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
      s = sae_training.train(train_acts, width=c.sae.width, k=c.sae.k, steps=c.sae.steps, batch=c.sae.batch,
                            lr=c.sae.lr, seed=c.seed, ckpt_dir=out / "sae_ckpt", ckpt_every=c.sae.ckpt_every)
      sae_lib.save_sae(out / "sae.npz", s, fp)
  q = sae_lib.quality(s, held_acts)
  q.update(layer=layer, train_rows=len(train_acts), sequences=len(per_seq))
  norms = np.linalg.norm(train_acts, axis=-1)
  return (s, fp, q, {"median": float(np.median(norms)), "mean": float(norms.mean())},
          sae_lib.active_means(s, held_acts))


# ----------------------------------------------------------------------------- features

def split_pairs(pairs, held_out: float, seed: int, stream: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(train indices, held-out indices, held-out scenario ids) of a value's pairs, split by
  scenario (a pair id is '<scenario>/<form>', so no scenario's forms fall on both sides): a
  seeded `held_out` share of the scenarios, at least one scenario kept for training (with one
  scenario nothing is held out)."""
  scen = [p.id.rsplit("/", 1)[0] for p in pairs]
  names = sorted(set(scen))
  n_held = min(int(round(held_out * len(names))), len(names) - 1)
  held = set(np.random.default_rng([seed, SPLIT_STREAM, stream]).permutation(names)[:max(n_held, 0)].tolist())
  return (np.asarray([i for i, s in enumerate(scen) if s not in held], int),
          np.asarray([i for i, s in enumerate(scen) if s in held], int), sorted(held))


def value_feature_table(r: Runner, s, inputs: Inputs, layer: int, c) -> tuple[dict, dict, dict]:
  """({value: [(latent, train score)...] best first}, {value: held-out figures of those latents},
  the split). Latents are ranked by the standardised difference of last-token activations at the
  SAE's layer between the two sides of the value's *training* pairs only (`split_pairs`, share
  c.sae.held_out of scenarios held out, seeded by c.seed and the value); the held-out pairs are
  read only afterwards, to report how the chosen latents separate them (`held_out_effect`)."""
  feats, valid, split = {}, {}, {"unit": "scenario", "seed": c.seed, "held_out_share": c.sae.held_out, "values": {}}
  for t, v in enumerate(VALUES):
    pairs = schwartz.value_pairs(v, scenarios=inputs.scenarios)
    acts = r.last_token_activations([p.positive for p in pairs] + [p.negative for p in pairs], c.batch_size)[layer]
    pos, neg = acts[:len(pairs)], acts[len(pairs):]
    train, held, held_ids = split_pairs(pairs, c.sae.held_out, c.seed, t)
    feats[v] = sae_lib.value_features(s, pos[train], neg[train], top=c.sae.top_features)
    valid[v] = [dict(h, train_score=score) for h, (_, score) in
                zip(sae_lib.held_out_effect(s, [f for f, _ in feats[v]], pos[held], neg[held], seed=c.seed), feats[v])]
    split["values"][v] = {"train_pairs": len(train), "held_out_pairs": len(held), "held_out_scenarios": held_ids}
  return feats, valid, split


def random_latent(width: int, exclude, active: np.ndarray, seed: int, stream: int) -> int:
  """A seeded random latent not in `exclude` (the value's chosen features), among those that
  fire on held-out corpus rows (active [F] > 0) when any does."""
  pool = [f for f in range(width) if f not in set(exclude)]
  alive = [f for f in pool if active[f] > 0]
  return int(np.random.default_rng([seed, LATENT_STREAM, stream]).choice(alive or pool))


# ----------------------------------------------------------------------------- steering

def sae_steering(sae, latent: int, layer: int, coef: float, n_layers: int, norm: float, active: np.ndarray,
                 mode: str, positions: str = "all", direction=None):
  """(intervention, absolute strength) for one latent at one layer. 'add': `AddToResidual` of
  the latent's unit decoder direction (or `direction` [D], a unit control vector) times coef x
  `norm` (the layer's median residual norm), so the edit's norm is |coef| x norm; 'clamp':
  `ClampLatent` setting the latent to coef x its mean active value (coef 0 ablates it), moving
  the residual along its decoder row (or along `direction`). positions 'all' edits every prefill
  and decode position; 'prompt' every prefill position (the whole prompt, answer position
  included) and no generated token. Every kind of steering is one class per mode with only
  its arrays differing, so features and controls run through the same compiled program."""
  where = edits.Where(span=jnp.asarray(STEERED_SPANS[positions], jnp.int32), relative=True)
  if mode == "add":
    d = sae_lib.unit_direction(sae, latent) if direction is None else jnp.asarray(direction, jnp.float32)
    scale = coef * norm
    vec = sae_lib.steering_vectors(sae, latent, layer, n_layers, d)
    return transformer.AddToResidual(vec, jnp.asarray(scale, jnp.float32), where), scale
  d = sae.W_dec[latent] if direction is None else jnp.asarray(direction, jnp.float32)
  value = coef * float(active[latent])
  return sae_lib.ClampLatent(sae, jnp.asarray(latent), jnp.asarray(layer), jnp.asarray(value, jnp.float32), d,
                             where), value


def value_conditions(sae, feats: list, t: int, layer: int, active: np.ndarray, n_layers: int, c) -> dict:
  """{kind: (latent, direction or None)} for value index t: the feature (its top latent), a
  random latent (`random_latent`, stream t) and a random direction (`controls.random_directions`
  of value t at the layer, the one a CAA control of the value gets there) of the feature's
  direction's norm (`controls.matched_norm`: unit in 'add' mode, the decoder row's in 'clamp')."""
  latent = feats[0][0]
  own = sae_lib.unit_direction(sae, latent) if c.sae.mode == "add" else sae.W_dec[latent]
  u = controls.random_directions(c.seed, t, (n_layers, sae.d_model))[layer]
  return {"feature": (latent, None),
          "random_latent": (random_latent(sae.width, [f for f, _ in feats], active, c.seed, t), None),
          "random_direction": (latent, controls.matched_norm(own, u))}


@dataclasses.dataclass(frozen=True, eq=False)
class SteerCondition:
  """One condition of the SAE sweep: value index t steered by `kind` (KINDS) through `latent`
  at coefficient `coef`, its intervention `iv` (shared form) and absolute strength, and `tag`,
  the condition's fingerprinted name (module docstring) its records are stored under."""
  t: int
  kind: str
  latent: int
  coef: float
  iv: Any
  strength: float
  tag: str


def steering_conditions(r: Runner, inputs: Inputs, c, sae, ctx: dict, feats: dict, lists) -> list[SteerCondition]:
  """Every condition of the sweep, value x coefficient x kind (c.sae.coefs, KINDS), fingerprinted
  by the SAE, layer, mode, positions, latent, coefficient, absolute strength and (direction)
  the control vector's digest, on top of what every score depends on (`scoring_inputs` of the
  no-role prompts `lists`)."""
  shared = scoring_inputs(r, inputs, c, [None], lists)
  mode, out = c.sae.mode, []
  for t, v in enumerate(VALUES):
    conds = value_conditions(sae, feats[v], t, ctx["layer"], ctx["active"], r.cfg.n_layers, c)
    for coef in map(float, c.sae.coefs):
      for kind in KINDS:
        latent, direction = conds[kind]
        iv, strength = sae_steering(sae, latent, ctx["layer"], coef, r.cfg.n_layers, ctx["norm"], ctx["active"], mode,
                                    c.sae.positions, direction)
        name = {"feature": f"sae-{mode}/{v}/{latent}/{coef:g}",
                "random_latent": f"control-latent-{mode}/{v}/{latent}/{coef:g}",
                "random_direction": f"control-direction-{mode}/{v}/{coef:g}"}[kind]
        dd = None if direction is None else digest(np.asarray(direction, np.float32))
        tag = keyed(name, *shared, [ctx["fp"], ctx["weights"], ctx["layer"], mode, c.sae.positions, v, kind, latent,
                                    coef, float(strength), dd])
        out.append(SteerCondition(t, kind, latent, coef, iv, float(strength), tag))
  return out


def _score_program(params, tokens, mask, option_ids, iv, *, cfg):
  """Expected answers and option masses [B] of a left-padded prompt batch tokens, mask [B, T]
  under the per-row steering iv (`questionnaire.expected_scores`, `option_mass`)."""
  z = likelihood.option_logits(params, cfg, tokens, mask, option_ids, iv, log_probs=True)
  return questionnaire.expected_scores(z), questionnaire.option_mass(z)


STEERED_SCORES = engine.Programs(_score_program, ("cfg",))


def steering_table(store: ResultStore, r: Runner, inputs: Inputs, c, conds: list[SteerCondition], lists
                   ) -> tuple[np.ndarray, np.ndarray]:
  """Scores every item (no role; its prompt tokens `lists`, `scoring.item_tokens`) under every
  condition: (scores, option mass) [conditions, I].

  The sweep is one table of rows (condition x item). Its rows share batches across values,
  kinds and coefficients (config.share_batches; else one condition per batch, the
  unit-by-unit way, with the same records), each row with its own steering fields
  (`transformer.per_row`: one intervention class per mode), in batches of one padded length
  and always the batch size, so a row's numbers do not depend on its batch-mates. One program
  per shape is compiled ahead of time (`engine.Programs`) and batch i+1 is dispatched before
  batch i is read. Each row's record names its condition's `tag` and its item; rows already
  in the store (under the tag, or under the unit prefix of the former one-condition-per-call
  records) are reused (`tables.pending_rows`), so a changed or extended sweep computes only
  its new rows."""
  items = inputs.items
  batch = r.round_batch(c.batch_size)
  table = [(k, j) for k in range(len(conds)) for j in range(len(items))]
  keys = [(conds[k].tag, items[j]["id"]) for k, j in table]
  record_key = lambda rec: (rec.get("cond") or rec.get("unit", "").rsplit("/", 1)[0], rec.get("item"))
  todo = tables.pending_rows(store, keys, record_key)
  units = tables.table_units(f"sae-{c.sae.mode}-table", todo, keys, [len(lists[j]) for _, j in table],
                             ["all" if c.share_batches else f"c{k}" for k, _ in table], batch, c.bucket)
  option_ids = option_ids_of(r)

  def dispatch(u: tables.TableUnit):
    rows = [table[i] for i in u.rows]
    tokens, mask = r.batch([lists[j] for _, j in rows], u.length, batch)
    parts = [transformer.per_row(conds[k].iv, len(list(run))) for k, run in itertools.groupby(rows, lambda x: x[0])]
    return STEERED_SCORES(r.model.params, tokens, mask, option_ids, transformer.concat_rows(parts, batch), cfg=r.cfg)

  def collect(u: tables.TableUnit, dispatched) -> list[dict]:
    e, m = r.local(dispatched)
    return [dict(_row=row, unit=u.key, cond=keys[u.rows[i]][0], item=keys[u.rows[i]][1], score=float(e[row]),
                 mass=float(m[row])) for row, i in r.mine(range(len(u.rows)), batch)]

  engine.stream(store, units, dispatch, f"SAE steering ({len(conds)} conditions)", collect=collect)
  where = {key: i for i, key in enumerate(keys)}
  scores, mass = np.full((2, len(conds), len(items)), np.nan)
  for rec in store.records():
    i = where.get(record_key(rec))
    if i is not None:
      scores[table[i]], mass[table[i]] = rec["score"], rec["mass"]
  return scores, mass


def feature_vs_direction(v: str, coef: float, scored: dict, base: np.ndarray, iv: Sequence[str], seed: int) -> list:
  """The paired comparison (items of value v, stratum-free) of the target change under the
  feature against the random direction at one coefficient: per item, its score change minus the
  mean change over all items (so the mean over v's items is the value-score change); [] with
  fewer than 2 items or at coef 0."""
  m = np.asarray(iv) == v
  if m.sum() < 2 or coef == 0:                       # at coef 0 both are the unsteered model by construction
    return []
  f, d = scored["feature", coef] - base, scored["random_direction", coef] - base
  return [stats.comparison(f"sae_target_change/{v}/{coef:g}", "sae_feature", "random_direction",
                           (f - f.mean())[m], (d - d.mean())[m], seed=seed)]


def dose_entry(v: str, t: int, kind: str, latent: int, coef: float, strength: float, d: np.ndarray, mass) -> dict:
  """One point of the dose-response: value v's score change d [V] (index t the target)."""
  return dict(value=v, kind=kind, latent=int(latent), coef=float(coef), strength=float(strength),
              target_change=float(d[t]), mean_abs_non_target=float(np.abs(np.delete(d, t)).mean()),
              delta=np.round(d, 4).tolist(), option_mass_mean=float(np.nanmean(mass)),
              option_mass_min=float(np.nanmin(mass)))


def sweep_value(t: int, conds: list[SteerCondition], scored: np.ndarray, masses: np.ndarray, base: np.ndarray,
                g: np.ndarray, iv: Sequence[str], c) -> tuple[list, list, list]:
  """Value t's dose-response from the table's scores [conditions, I] and option mass: (dose
  entries, feature steering entries with side effects, paired comparisons)."""
  v = VALUES[t]
  dose, steering, comps, by = [], [], [], {}
  for k, cd in enumerate(conds):
    if cd.t != t:
      continue
    d = (questionnaire.value_scores(scored[k][None], iv) - questionnaire.value_scores(base[None], iv))[0]
    dose.append(dose_entry(v, t, cd.kind, cd.latent, cd.coef, cd.strength, d, masses[k]))
    by[cd.kind, cd.coef] = scored[k]
    if cd.kind == "feature":
      steering.append(dict(named(causal_graph.side_effects(d, t, g, c.side_effect_threshold)), target=v,
                           latent=cd.latent, coef=cd.coef, scale=cd.strength, delta=np.round(d, 4).tolist(),
                           **{key: dose[-1][key] for key in ("option_mass_mean", "option_mass_min")}))
    if cd.kind == KINDS[-1]:                        # every kind of this coefficient is in
      comps += feature_vs_direction(v, cd.coef, by, base, iv, c.seed)
  return dose, steering, comps


def sae_part(store: ResultStore, r: Runner, inputs: Inputs, c, out: Path, layer: int, items: np.ndarray,
             g: np.ndarray) -> dict:
  """The SAE, its value features (chosen on training pairs, checked on held-out ones) and, per
  value, coefficient and kind (feature, random latent, random direction), the change of all
  value scores (no role) against the unsteered scores `items` [1 + roles, I] row 0; side
  effects of the feature judged against graph g; the paired feature - random direction
  comparisons (Holm across the table); option mass per condition and unsteered (role scoring,
  reused from the store); sae_dose_response.png in `out`."""
  sae, fp, q, norms, active = get_sae(store, r, inputs, c, out, layer)
  feats, valid, split = value_feature_table(r, sae, inputs, layer, c)
  ctx = dict(fp=fp, weights=sae_lib.sae_digest(sae), layer=layer, norm=norms["median"], active=active)
  lists, _ = item_tokens(r, inputs)
  conds = steering_conditions(r, inputs, c, sae, ctx, feats, lists)
  scored, masses = steering_table(store, r, inputs, c, conds, lists)
  dose, steering, comps = [], [], []
  for t in range(len(VALUES)):
    d, s, cp = sweep_value(t, conds, scored, masses, items[0], g, [it["value"] for it in inputs.items], c)
    dose, steering, comps = dose + d, steering + s, comps + cp
  _, unsteered = role_scores(store, r, inputs, c, with_mass=True)
  low = min(dose, key=lambda e: e["option_mass_min"])
  plot_dose_response(out / "sae_dose_response.png", dose, f"{r.model.name}: SAE steering at layer {layer} "
                     f"({c.sae.mode}, {c.sae.positions} positions) against two controls")
  return {"quality": q, "fingerprint": fp[:12], "median_residual_norm": norms["median"],
          "mean_residual_norm": norms["mean"], "mode": c.sae.mode, "positions": c.sae.positions,
          "coef_unit": "median residual norm" if c.sae.mode == "add" else "latent's mean active value",
          "features": feats, "feature_validation": valid, "split": split, "steering": steering, "dose_response": dose,
          "comparisons": stats.with_holm(comps),
          "option_mass": {"no role": mass_stats(unsteered[:1], inputs.items),
                          "roles": mass_stats(unsteered[1:], inputs.items),
                          "sae conditions": dict(mass_stats(masses, inputs.items),
                                                 lowest_condition=f"{low['value']}/{low['kind']}/{low['coef']:g}")}}
