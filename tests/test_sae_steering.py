"""SAE steering under the protocol (rules 1, 7, 8): controls run through the feature's program
with its norm, zero strength is a no-op for every kind, features are chosen on training pairs
only, steering positions behave as documented, and the option mass is the softmax mass on the
option tokens. Tiny random models (tests/hf_tiny.py)."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import causal as causal_config
from valuedist.data import schwartz
from valuedist.eval import likelihood
from valuedist.model import edits, sampler, transformer
from valuedist.parallel import sharding
from valuedist.studies import engine, runner
from valuedist.studies.causal import inputs as causal_inputs, report as causal_report, sae as causal_sae, scoring
from valuedist.values import questionnaire, sae as sae_lib
from tests import hf_tiny

LAYER = 1
OPTION_IDS = jnp.asarray([[10, 40], [11, -1], [12, -1], [13, 50], [14, -1], [15, -1]])


@pytest.fixture(scope="module")
def tiny():
  """(cfg, params, tokens, mask, a TopK SAE on the residual width, [F] active means)."""
  _, cfg, params = hf_tiny.build("llama")
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(0), cfg.vocab_size, [9, 6, 4])
  s = sae_lib.init_topk(jax.random.PRNGKey(1), cfg.d_model, 32, 4)
  active = np.linspace(0.5, 2.0, 32)
  return cfg, jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), jnp.asarray(mask), s, active


def config(mode="add", positions="all", **sae):
  c = causal_config.get_config()
  c.sae.mode, c.sae.positions = mode, positions
  for k, v in sae.items():
    setattr(c.sae, k, v)
  return c


def interventions(s, cfg, c, coef, norm, active, t=3):
  """{kind: intervention} of value index t (top features 5, 6, 7) at `coef`."""
  conds = causal_sae.value_conditions(s, [(5, 2.0), (6, 1.0), (7, 0.5)], t, LAYER, active, cfg.n_layers, c)
  assert conds["random_latent"][0] not in (5, 6, 7)
  return {kind: causal_sae.sae_steering(s, latent, LAYER, coef, cfg.n_layers, norm, active, c.sae.mode,
                                        c.sae.positions, direction)[0]
          for kind, (latent, direction) in conds.items()}


def edit_at_layer(iv, h):
  ctx = transformer.Context.simple(h.shape[0], h.shape[1], LAYER)
  return np.asarray(iv.edit("resid_post", h, ctx) - h)


@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_controls_run_through_the_feature_program_with_its_norm(tiny, mode):
  cfg, params, tokens, mask, s, active = tiny
  ivs = interventions(s, cfg, config(mode), 0.5, 7.0, active)
  feature = ivs["feature"]
  want = likelihood.option_logits.lower(params, cfg, tokens, mask, OPTION_IDS, feature, log_probs=True).as_text()
  for kind, iv in ivs.items():
    assert type(iv) is type(feature), kind
    assert jax.tree.structure(iv) == jax.tree.structure(feature), kind
    assert [(x.shape, x.dtype) for x in jax.tree.leaves(iv)] == [(x.shape, x.dtype) for x in jax.tree.leaves(feature)]
    got = likelihood.option_logits.lower(params, cfg, tokens, mask, OPTION_IDS, iv, log_probs=True).as_text()
    assert got == want, f"{kind} compiles to another program than the feature"
  h = jax.random.normal(jax.random.PRNGKey(0), (3, 5, cfg.d_model))
  norms = {kind: np.linalg.norm(edit_at_layer(iv, h), axis=-1) for kind, iv in ivs.items()}
  assert np.all(norms["feature"] > 0)
  np.testing.assert_allclose(norms["random_direction"], norms["feature"], rtol=1e-4)   # same norm, every position
  if mode == "add":                                         # |coef| x the median norm for every kind
    for kind in ivs:
      np.testing.assert_allclose(norms[kind], 0.5 * 7.0, rtol=1e-4)
  f, d = edit_at_layer(feature, h), edit_at_layer(ivs["random_direction"], h)
  cos = np.abs((f * d).sum(-1)) / (norms["feature"] * norms["random_direction"])
  assert np.all(cos < 0.9)                                  # another direction, not the feature's


def test_random_direction_is_seeded_per_value(tiny):
  cfg, _, _, _, s, active = tiny
  c = config()
  one = causal_sae.value_conditions(s, [(5, 1.0)], 2, LAYER, active, cfg.n_layers, c)["random_direction"][1]
  again = causal_sae.value_conditions(s, [(5, 1.0)], 2, LAYER, active, cfg.n_layers, c)["random_direction"][1]
  other = causal_sae.value_conditions(s, [(5, 1.0)], 3, LAYER, active, cfg.n_layers, c)["random_direction"][1]
  np.testing.assert_array_equal(np.asarray(one), np.asarray(again))
  assert not np.allclose(np.asarray(one), np.asarray(other))
  assert causal_sae.random_latent(32, [5], active, 0, 2) == causal_sae.random_latent(32, [5], active, 0, 2)


def test_zero_coefficient_changes_nothing_for_every_kind(tiny):
  cfg, params, tokens, mask, s, active = tiny
  base, _, _ = transformer.forward(params, tokens, cfg, attention_mask=mask)
  for positions in ("all", "prompt"):
    for kind, iv in interventions(s, cfg, config(positions=positions), 0.0, 7.0, active).items():
      got, _, _ = transformer.forward(params, tokens, cfg, attention_mask=mask, intervene=iv)
      np.testing.assert_array_equal(np.asarray(got), np.asarray(base), err_msg=f"{kind} ({positions})")
    for kind, iv in interventions(s, cfg, config(positions=positions), 1.0, 7.0, active).items():
      got, _, _ = transformer.forward(params, tokens, cfg, attention_mask=mask, intervene=iv)
      assert np.abs(np.asarray(got) - np.asarray(base)).max() > 1e-3, f"{kind} at coef 1 must move the logits"


# ----------------------------------------------------------------------------- positions

def test_prompt_and_all_positions_coincide_for_option_scoring_and_differ_in_generation(tiny):
  cfg, params, tokens, mask, s, active = tiny
  ivs = {p: interventions(s, cfg, config(positions=p), 1.0, 7.0, active)["feature"] for p in ("all", "prompt")}
  z = {p: likelihood.option_logits(params, cfg, tokens, mask, OPTION_IDS, iv, log_probs=True)
       for p, iv in ivs.items()}
  np.testing.assert_array_equal(np.asarray(z["all"]), np.asarray(z["prompt"]))       # one pass over the prompt
  plain = likelihood.option_logits(params, cfg, tokens, mask, OPTION_IDS, log_probs=True)
  assert np.abs(np.asarray(z["all"]) - np.asarray(plain)).max() > 1e-3

  def observe(logits, taps, aux):
    return logits
  g = {p: sampler.generate(params, tokens, mask, cfg, max_new_tokens=3, intervene=iv, observe=observe)
       for p, iv in ivs.items()}
  np.testing.assert_array_equal(np.asarray(g["all"].observed[0]), np.asarray(g["prompt"].observed[0]))   # prefill
  np.testing.assert_array_equal(np.asarray(g["all"].tokens[:, 0]), np.asarray(g["prompt"].tokens[:, 0]))
  assert np.abs(np.asarray(g["all"].observed[1]) - np.asarray(g["prompt"].observed[1])).max() > 1e-4   # decode steps
  # a decode step (the first generated token: position = prompt length) is steered by 'all' only
  h = jax.random.normal(jax.random.PRNGKey(1), (3, 1, cfg.d_model))
  step = transformer.Context.create(jnp.full((3, 1), 5), jnp.ones((3, 1)), step=1, prompt_len=jnp.full((3,), 5))
  step = step._replace(layer=jnp.asarray(LAYER))
  np.testing.assert_array_equal(np.asarray(g["prompt"].decode_intervention.edit("resid_post", h, step)), np.asarray(h))
  assert np.abs(np.asarray(g["all"].decode_intervention.edit("resid_post", h, step) - h)).max() > 1e-4


@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_a_position_mask_edits_only_its_positions(tiny, mode):
  cfg, params, tokens, mask, s, active = tiny
  iv = interventions(s, cfg, config(mode), 1.0, 7.0, active)["feature"]
  only_last = edits.Where(positions=jnp.asarray([-1]), relative=True)
  h = jax.random.normal(jax.random.PRNGKey(2), tokens.shape + (cfg.d_model,))
  full, masked = edit_at_layer(iv, h), edit_at_layer(iv.replace(where=only_last), h)
  np.testing.assert_array_equal(masked[:, :-1], 0.0)
  np.testing.assert_allclose(masked[:, -1], full[:, -1], rtol=1e-6)
  assert np.abs(full[:, :-1]).max() > 0


# ----------------------------------------------------------------------------- option mass

def test_option_mass_is_the_softmax_mass_on_the_option_tokens(tiny):
  cfg, params, tokens, mask, s, active = tiny
  for iv in (None, interventions(s, cfg, config(), 0.5, 7.0, active)["random_latent"]):
    z = likelihood.option_logits(params, cfg, tokens, mask, OPTION_IDS, iv, log_probs=True)
    logits, _, _ = transformer.forward(params, tokens, cfg, attention_mask=mask, intervene=iv)
    full = np.asarray(logits[:, -1], np.float64)
    p = np.exp(full - full.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    ids = [i for i in np.asarray(OPTION_IDS).ravel() if i >= 0]
    mass = np.asarray(questionnaire.option_mass(z))
    np.testing.assert_allclose(mass, p[:, ids].sum(1), rtol=1e-4)
    assert np.all((mass >= 0) & (mass <= 1))
    raw = likelihood.option_logits(params, cfg, tokens, mask, OPTION_IDS, iv)       # the readout keeps the answer
    np.testing.assert_allclose(np.asarray(questionnaire.expected_scores(z)),
                               np.asarray(questionnaire.expected_scores(raw)), atol=1e-5)


# ----------------------------------------------------------------------------- feature selection

class FakeRunner:
  """last_token_activations from a table: text -> [D] (one layer)."""

  def __init__(self, table):
    self.table = table

  def last_token_activations(self, texts, batch):
    return np.stack([self.table[t] for t in texts])[None]


def identity_sae(d):
  """encode(x) = relu(x): latent i reads residual dimension i."""
  eye = jnp.eye(d)
  return sae_lib.SAE(eye, jnp.zeros(d), eye, jnp.zeros(d), jnp.zeros(d), kind="topk", k=d)


def test_feature_selection_never_reads_held_out_pairs():
  scen = [s for v in causal_inputs.VALUES for s in [x for x in schwartz.load_scenarios() if x["value"] == v][:4]]
  inputs = causal_inputs.Inputs([], [], [], scen, [], [])
  c = config(held_out=0.5, top_features=2)
  table, held_nan, all_rows = {}, {}, {}
  for t, v in enumerate(causal_inputs.VALUES):
    pairs = schwartz.value_pairs(v, scenarios=scen)
    train, held, held_ids = causal_sae.split_pairs(pairs, 0.5, c.seed, t)
    assert len(held_ids) == 2 and len(train) == len(held) == 8
    assert not {pairs[i].id.split("/")[0] for i in train} & set(held_ids)           # split by scenario
    pos, neg = np.ones((len(pairs), 3)), np.ones((len(pairs), 3))
    form = np.arange(len(pairs)) // (len(pairs) // 4)         # pairs run form-major: each scenario has all 4 forms
    pos[:, 1], neg[:, 1] = 1.3 + 0.5 * (-1) ** form, 1.0 + 0.5 * (-1) ** (form // 2)   # 0.3 apart in every split
    pos[held, 0], neg[held, 0] = 10.0, 0.0                 # latent 0 separates the held-out pairs only
    all_rows[v] = (pos, neg)
    for i, p in enumerate(pairs):
      table[p.positive], table[p.negative] = pos[i], neg[i]
      held_nan[p.positive], held_nan[p.negative] = (np.full(3, np.nan),) * 2 if i in held else (pos[i], neg[i])
  s = identity_sae(3)
  feats, valid, split = causal_sae.value_feature_table(FakeRunner(table), s, inputs, 0, c)
  for v in causal_inputs.VALUES:
    assert sae_lib.value_features(s, *all_rows[v], top=1)[0][0] == 0        # on all pairs latent 0 would win
    assert feats[v][0][0] == 1, v                                           # chosen on training pairs: latent 1
    assert valid[v][0]["latent"] == 1 and valid[v][0]["pairs"] == 8 and valid[v][0]["chance"] == 0.5
    assert split["values"][v]["held_out_pairs"] == 8
  blind, _, _ = causal_sae.value_feature_table(FakeRunner(held_nan), s, inputs, 0, c)
  assert blind == feats                                      # held-out activations never enter the choice


def test_held_out_effect_figures():
  s = identity_sae(2)
  pos = np.array([[2.0, 0.0], [3.0, 1.0], [1.0, 1.0], [4.0, 0.0]])
  neg = np.array([[1.0, 0.0], [1.0, 2.0], [0.0, 1.0], [2.0, 0.0]])
  a, b = sae_lib.held_out_effect(s, [0, 1], pos, neg, seed=0)
  assert a["held_out_accuracy"] == 1.0 and a["p"] < 0.1 and a["held_out_score"] > 1
  assert b["held_out_accuracy"] == pytest.approx((0.5 + 0 + 0.5 + 0.5) / 4)
  assert sae_lib.held_out_effect(s, [0], pos[:0], neg[:0])[0]["held_out_score"] is None


# ----------------------------------------------------------------------------- the study's SAE part

@pytest.fixture(scope="module")
def study(tmp_path_factory):
  """(inputs, config, store, summary of sae_part, out folder) on a tiny model: two items and two
  scenarios per value, coefficients 0 and 0.5."""
  root = tmp_path_factory.mktemp("sae_steering")
  model_dir = str(hf_tiny.save_model_dir(root / "m", "llama", seed=3, chat_template=hf_tiny.CHAT_TEMPLATE,
                                         max_positions=1024))
  c = causal_config.get_config()
  c.models, c.batch_size, c.bucket, c.mesh.data, c.max_roles = model_dir, 16, 128, 1, 14
  c.sae.layer, c.sae.width, c.sae.k, c.sae.steps, c.sae.batch, c.sae.ckpt_every = LAYER, 32, 4, 10, 32, 5
  c.sae.corpus_new_tokens, c.sae.max_tokens, c.sae.coefs, c.sae.held_out = 0, 16, (0.0, 0.5), 0.5
  full = causal_inputs.resolve_inputs(c)
  first = lambda rows, n: [x for v in causal_inputs.VALUES for x in [y for y in rows if y["value"] == v][:n]]
  inputs = dataclasses.replace(full, items=first(full.items, 2), roles=full.roles[:2],
                               scenarios=first(full.scenarios, 2), prompts=full.prompts[:2], dilemmas=full.dilemmas[:1])
  r = runner.load_runner("model", model_dir, c, [], sharding.make_mesh(1))
  store = engine.ResultStore(root / "records.jsonl")
  items = scoring.role_scores(store, r, inputs, c)
  g = np.zeros((len(causal_inputs.VALUES),) * 2, int)
  s = causal_sae.sae_part(store, r, inputs, c, root, LAYER, items, g)
  return inputs, c, store, s, root, (r, items, g)


def test_sae_part_sweeps_feature_and_controls(study):
  inputs, c, store, s, root, _ = study
  dose = s["dose_response"]
  assert len(dose) == len(causal_inputs.VALUES) * 2 * 3
  assert {(e["kind"], e["coef"]) for e in dose} == {(k, x) for k in causal_sae.KINDS for x in (0.0, 0.5)}
  for e in dose:
    if e["coef"] == 0.0:
      assert np.abs(e["delta"]).max() == 0, e                 # zero strength: no change, every kind
    assert 0 <= e["option_mass_min"] <= e["option_mass_mean"] <= 1
  moved = [e for e in dose if e["coef"] == 0.5]
  assert all(np.abs(e["delta"]).max() > 0 for e in moved)
  assert all(e["strength"] == pytest.approx(0.5 * s["median_residual_norm"]) for e in moved)
  assert s["median_residual_norm"] > 0 and s["mean_residual_norm"] > 0 and s["positions"] == "all"
  for v in causal_inputs.VALUES:
    feats = {f for f, _ in s["features"][v]}
    rl = {e["latent"] for e in dose if e["value"] == v and e["kind"] == "random_latent"}
    assert len(rl) == 1 and not rl & feats
    assert s["split"]["values"][v] == {**s["split"]["values"][v], "train_pairs": 4, "held_out_pairs": 4}
  assert len(s["steering"]) == len(causal_inputs.VALUES) * 2 and all(e["option_mass_min"] >= 0 for e in s["steering"])
  comps = s["comparisons"]
  assert len(comps) == len(causal_inputs.VALUES)              # one per value at coef 0.5 (coef 0 is 0 by construction)
  schema = {"metric", "treatment", "control", "estimate", "ci", "p", "p_holm", "n", "paired"}
  assert all(set(x) == schema and x["n"] == 2 and x["p_holm"] is not None for x in comps)
  assert set(s["option_mass"]) == {"no role", "roles", "sae conditions"}
  assert all(0 <= m["min"] <= m["mean"] <= 1 for m in s["option_mass"].values())
  assert (root / "sae_dose_response.png").stat().st_size > 0
  md = "\n".join(causal_report._sae_md(s))
  assert "random direction" in md and "Option mass" in md and "held-out" in md


def test_every_condition_has_its_own_fingerprinted_key_and_is_reused(study):
  inputs, c, store, s, root, (r, items, g) = study
  recs = [rec for rec in store.records() if "cond" in rec]
  conds = list(dict.fromkeys(rec["cond"] for rec in recs))
  pats = [r"sae-add/\w+/\d+/(0|0\.5)#[0-9a-f]{12}", r"control-latent-add/\w+/\d+/(0|0\.5)#[0-9a-f]{12}",
          r"control-direction-add/\w+/(0|0\.5)#[0-9a-f]{12}"]
  for p in pats:
    assert len([k for k in conds if re.fullmatch(p, k)]) == len(causal_inputs.VALUES) * 2, p
  assert len(conds) == 3 * 2 * len(causal_inputs.VALUES)
  assert sorted((rec["cond"], rec["item"]) for rec in recs) == sorted({(rec["cond"], rec["item"]) for rec in recs})
  assert len(recs) == len(conds) * len(inputs.items)               # one record per condition x item
  masses = [rec["mass"] for rec in store.records() if "mass" in rec]
  assert masses and all(0 <= m <= 1 for m in masses)
  n = len(store.records())
  again = causal_sae.sae_part(store, r, inputs, c, root, LAYER, items, g)
  assert len(store.records()) == n and again["dose_response"] == s["dose_response"]
  c2 = c.copy_and_resolve_references()
  c2.sae.positions = "prompt"
  causal_sae.sae_part(store, r, inputs, c2, root, LAYER, items, g)
  new = {rec["cond"] for rec in store.records()[n:] if "cond" in rec}
  assert len(new) == 3 * 2 * len(causal_inputs.VALUES) and not new & set(conds)
  n = len(store.records())                                           # an extended sweep computes only its new rows
  c3 = c.copy_and_resolve_references()
  c3.sae.coefs = (0.0, 0.25, 0.5)
  extended = causal_sae.sae_part(store, r, inputs, c3, root, LAYER, items, g)
  added = {rec["cond"] for rec in store.records()[n:]}
  assert len(added) == 3 * len(causal_inputs.VALUES) and all("/0.25#" in k for k in added)
  old = [e for e in extended["dose_response"] if e["coef"] != 0.25]
  assert old == s["dose_response"]


def direct_scores(r, inputs, cond):
  """Expected answers [I] of the no-role items under one condition's own (shared-form)
  intervention, one condition per call, without the table."""
  lists = r.encode([{"prompt": questionnaire.item_prompt(it)} for it in inputs.items])
  tokens, mask = r.batch(lists, max(map(len, lists)), len(lists))
  z = likelihood.option_logits(r.model.params, r.cfg, tokens, mask, scoring.option_ids_of(r), cond.iv, log_probs=True)
  return np.asarray(questionnaire.expected_scores(z)), np.asarray(questionnaire.option_mass(z))


@pytest.mark.parametrize("mode", ["add", "clamp"])
def test_the_shared_table_equals_one_condition_per_batch_and_each_conditions_own_run(study, tmp_path, mode):
  """Rows of every value, kind and coefficient sharing batches give bitwise the scores of one
  condition per batch (the unit-by-unit way), and each row gets its own condition's steering:
  equal, within f32 rounding, to scoring each condition alone with its shared-form intervention."""
  inputs, c, _, _, _, (r, _, _) = study
  s = sae_lib.init_topk(jax.random.PRNGKey(1), r.cfg.d_model, 32, 4)
  active = np.linspace(0.5, 2.0, 32)
  feats = {v: [(3 + t, 1.0), (20 + t % 5, 0.5)] for t, v in enumerate(causal_inputs.VALUES)}
  ctx = dict(fp="f", weights="w", layer=LAYER, norm=7.0, active=active)
  out = {}
  for share in (True, False):
    cs = c.copy_and_resolve_references()
    cs.sae.mode, cs.share_batches, cs.bucket, cs.batch_size = mode, share, 16, 8
    lists, _ = scoring.item_tokens(r, inputs)
    conds = causal_sae.steering_conditions(r, inputs, cs, s, ctx, feats, lists)
    store = engine.ResultStore(tmp_path / f"{share}" / "records.jsonl")
    out[share] = causal_sae.steering_table(store, r, inputs, cs, conds, lists)
    per_unit = {}
    for rec in store.records():
      per_unit.setdefault(rec["unit"], set()).add(rec["cond"])
    widest = max(map(len, per_unit.values()))                      # conditions in one batch
    assert widest > 1 if share else widest == 1
  for a, b in zip(out[True], out[False]):
    np.testing.assert_array_equal(a, b)
  assert np.isfinite(out[True][0]).all() and np.ptp(out[True][0], axis=0).max() > 1e-4
  for k in (0, 4, len(conds) - 1):
    want_e, want_m = direct_scores(r, inputs, conds[k])
    np.testing.assert_allclose(out[True][0][k], want_e, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out[True][1][k], want_m, rtol=1e-4, atol=1e-7)


def test_rows_of_one_batch_must_share_the_sae_and_layer(tiny):
  cfg, _, _, _, s, active = tiny
  a = sae_lib.ClampLatent(s, jnp.asarray(3), jnp.asarray(LAYER), jnp.asarray(1.0), s.W_dec[3])
  other = sae_lib.init_topk(jax.random.PRNGKey(9), cfg.d_model, 16, 4)
  b = sae_lib.ClampLatent(other, jnp.asarray(3), jnp.asarray(LAYER), jnp.asarray(1.0), other.W_dec[3])
  ok = transformer.concat_rows([transformer.per_row(a, 2), transformer.per_row(a.replace(latent=jnp.asarray(5)), 1)], 4)
  assert ok.latent.tolist() == [3, 3, 5, 5] and ok.direction.shape == (4, cfg.d_model)
  with pytest.raises(ValueError, match="ClampLatent.sae differs between the parts of one batch"):
    transformer.concat_rows([transformer.per_row(a, 2), transformer.per_row(b, 2)], 4)
