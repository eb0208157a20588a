"""Value scoring from option tokens, PC recovery, circumplex comparison, SAEs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valuedist.eval import likelihood as evaluation
from valuedist.model import transformer as model
from valuedist.values import causal_graph as causal, questionnaire, sae as sae_lib, sae_training
from valuedist.data import schwartz
from tests import hf_tiny


@pytest.fixture(scope="module")
def tiny():
  _, cfg, params = hf_tiny.build("llama")
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(0), cfg.vocab_size, [9, 6, 4])
  return cfg, jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), jnp.asarray(mask)


def test_option_scoring_equals_direct_softmax(tiny):
  cfg, params, tokens, mask = tiny
  option_ids = jnp.asarray([[10, 40], [11, -1], [12, -1], [13, 50], [14, -1], [15, -1]])
  got = evaluation.option_logits(params, cfg, tokens, mask, option_ids)
  logits, _, _ = model.forward(params, tokens, cfg, attention_mask=mask)
  z = np.asarray(logits[:, -1])
  want = np.stack([np.logaddexp(z[:, 10], z[:, 40]), z[:, 11], z[:, 12], np.logaddexp(z[:, 13], z[:, 50]),
                   z[:, 14], z[:, 15]], 1)
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4)
  p = np.exp(want - want.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  np.testing.assert_allclose(np.asarray(questionnaire.expected_scores(got)), p @ np.arange(1, 7), atol=1e-4)


def test_value_scores_centre_by_row_mean():
  items = np.asarray([[1.0, 3.0, 5.0, 5.0], [2.0, 2.0, 2.0, 6.0]])
  got = questionnaire.value_scores(items, ["power", "power", "security", "security"], values=("power", "security"))
  np.testing.assert_allclose(got, [[2 - 3.5, 5 - 3.5], [2 - 3.0, 4 - 3.0]])


def _linear_gaussian(n=3000, seed=0):
  """A -> B -> C, A -> D, E independent; returns data [n, 5] and the true skeleton."""
  rng = np.random.default_rng(seed)
  a = rng.normal(size=n)
  b = 0.8 * a + rng.normal(size=n)
  c = -0.7 * b + rng.normal(size=n)
  d = 0.6 * a + rng.normal(size=n)
  e = rng.normal(size=n)
  sk = np.zeros((5, 5), bool)
  for i, j in ((0, 1), (1, 2), (0, 3)):
    sk[i, j] = sk[j, i] = True
  return np.stack([a, b, c, d, e], 1), sk


def test_pc_recovers_the_skeleton_of_a_linear_gaussian_dag():
  x, sk = _linear_gaussian()
  g = causal.pc_graph(x, 0.01)
  np.testing.assert_array_equal(causal.skeleton(g), sk)
  st = causal.bootstrap_stability(x[:600], 0.01, n=10)
  assert st["skeleton"][0, 1] >= 0.9 and st["skeleton"][4, 2] <= 0.3
  assert causal.possible_descendants(g, 0) == [1, 2, 3]
  assert causal.possible_descendants(g, 4) == []


def test_circumplex_reference_and_agreement():
  sign, ref = causal.circumplex_reference()
  v = len(schwartz.VALUES)
  assert ref.sum() == 2 * 12 and sign[0, 1] == 1 and sign[0, 5] == -1 and sign[0, 2] == 0
  corr = sign.astype(float)
  g = np.where(ref, -1, 0)
  a = causal.agreement(corr, g, sign, ref)
  assert a["sign_agreement"] == 1 and a["precision"] == 1 and a["recall"] == 1 and a["shd"] == 0
  a = causal.agreement(-corr, np.zeros((v, v)), sign, ref)
  assert a["sign_agreement"] == 0 and a["recall"] == 0 and a["shd"] == 12


def _pairs(m, want):
  v = schwartz.VALUES
  return {frozenset((v[i], v[j])) for i in range(len(v)) for j in range(i + 1, len(v)) if m[i, j] == want}


def test_circumplex_has_nine_positions_with_conformity_and_tradition_in_one_wedge():
  sign, ref = causal.circumplex_reference()
  ix = {k: i for i, k in enumerate(schwartz.VALUES)}
  s = lambda a, b: sign[ix[a], ix[b]]
  assert sign.dtype == np.int8 and (sign == sign.T).all() and (np.diag(sign) == 0).all()
  assert causal.circle_position("conformity") == causal.circle_position("tradition") == 6
  assert len(causal.CIRCLE) == 9
  assert s("conformity", "tradition") == 1 and s("benevolence", "universalism") == 1
  assert s("achievement", "power") == 1 and s("tradition", "security") == 1
  assert s("tradition", "benevolence") == 1 and s("universalism", "self_direction") == 1
  assert s("self_direction", "tradition") == -1 and s("power", "universalism") == -1
  assert s("stimulation", "security") == -1 and s("achievement", "benevolence") == -1
  assert s("self_direction", "power") == 0 and s("hedonism", "tradition") == 0
  assert s("self_direction", "achievement") == 0 and s("hedonism", "benevolence") == 0
  ring = ["self_direction", "stimulation", "hedonism", "achievement", "power", "security", "conformity",
          "benevolence", "universalism"]                  # tradition shares conformity's wedge
  pos = {frozenset((ring[i], ring[(i + 1) % 9])) for i in range(9)}
  pos |= {frozenset(p) for p in [("conformity", "tradition"), ("security", "tradition"), ("tradition", "benevolence")]}
  neg = {frozenset((a, b)) for a in ("self_direction", "stimulation") for b in ("security", "conformity", "tradition")}
  neg |= {frozenset((a, b)) for a in ("achievement", "power") for b in ("benevolence", "universalism")}
  assert _pairs(sign, 1) == pos and _pairs(sign, -1) == neg and len(_pairs(sign, 0)) == 45 - 12 - 10
  np.testing.assert_array_equal(ref, sign == 1)
  sub, sub_ref = causal.circumplex_reference(("universalism", "power", "benevolence"))
  np.testing.assert_array_equal(sub, [[0, -1, 1], [-1, 0, -1], [1, -1, 0]])
  assert sub_ref[0, 2] and not sub_ref[0, 1]


def _noise(seed, r=100, v=10, centre=True):
  x = np.random.default_rng(seed).normal(size=(r, v))
  return x - x.mean(1, keepdims=True) if centre else x


def _by_metric(out):
  return {e["metric"]: e for e in out["comparisons"]}


def test_chance_entries_have_exactly_the_schema_keys():
  sign, ref = causal.circumplex_reference()
  out = causal.agreement_with_chance(_noise(0), np.where(ref, -1, 0), sign, ref, n_null=200, n_boot=100)
  assert [e["metric"] for e in out["comparisons"]] == ["sign_agreement", "precision", "recall", "shd"]
  for e in out["comparisons"]:
    assert set(e) == {"metric", "observed", "chance", "null_percentile", "ci", "null_interval"}
    assert tuple(e) == causal.ENTRY_KEYS
    assert len(e["null_interval"]) == 2 and e["null_interval"][0] <= e["null_interval"][1]
  m = _by_metric(out)
  assert len(m["sign_agreement"]["ci"]) == 2 and m["precision"]["ci"] is None and m["shd"]["ci"] is None
  assert out["centring_floor"]["expected_correlation"] == pytest.approx(-1 / 9)
  assert out["centring_floor"]["sign_agreement_all_negative"] == pytest.approx(10 / 22)
  import json
  json.dumps(out)
  e = causal.chance_entry("x", 1.0, np.asarray([0.0, 1.0, 1.0, 2.0, np.nan]), None)   # ties count as <= observed
  assert e["null_percentile"] == 75 and e["chance"] == 1 and e["ci"] is None
  with pytest.raises(ValueError, match="must all be 10x10"):
    causal.agreement_with_chance(_noise(0), np.zeros((3, 3)), sign, ref)


def test_sign_agreement_on_unstructured_scores_sits_at_its_permutation_chance():
  sign, ref = causal.circumplex_reference()
  g = np.zeros((10, 10))
  pct, gap = [], []
  for seed in range(20):
    x = _noise(seed)
    e = _by_metric(causal.agreement_with_chance(x, g, sign, ref, n_null=400, n_boot=100, seed=seed))["sign_agreement"]
    assert e["observed"] == causal.agreement(np.corrcoef(x.T), g, sign, ref)["sign_agreement"]
    assert 10 / 22 < e["chance"] < 0.49                  # centring makes correlations negative: chance is not 1/2
    pct.append(e["null_percentile"])
    gap.append(e["observed"] - e["chance"])
  assert 25 < np.mean(pct) < 75 and not all(p < 5 for p in pct) and not all(p > 95 for p in pct)
  assert sum(p < 2.5 or p > 97.5 for p in pct) <= 4
  assert abs(np.mean(gap)) < 0.05
  raw = _by_metric(causal.agreement_with_chance(_noise(0, centre=False), g, sign, ref, n_null=1000, n_boot=10,
                                                centre=False))["sign_agreement"]
  assert abs(raw["chance"] - 0.5) < 0.02                  # no centring, no pull towards negative correlations


def test_sign_null_permutes_columns_then_recentres_rows():
  """The null's mean matches a direct loop: permute every column across roles, centre rows, correlate."""
  sign, ref = causal.circumplex_reference()
  iu = np.triu_indices(10, 1)
  have = sign[iu] != 0
  x = _noise(3)
  rng = np.random.default_rng(123)
  loop = []
  for _ in range(600):
    p = np.stack([rng.permutation(x[:, j]) for j in range(10)], 1)
    p -= p.mean(1, keepdims=True)
    loop.append(np.mean(np.sign(np.corrcoef(p.T)[iu][have]) == sign[iu][have]))
  got = causal.sign_null(x, sign, 3000, np.random.default_rng(0))
  assert abs(got.mean() - np.mean(loop)) < 0.012
  assert got.mean() < 0.485                               # without re-centring the null mean would be ~0.5


def _circumplex_scores(seed, r=100, noise=0.5):
  rng = np.random.default_rng(seed)
  theta = 2 * np.pi * np.asarray([causal.circle_position(v) for v in schwartz.VALUES]) / 9
  ab = rng.normal(size=(r, 2))
  x = ab[:, :1] * np.cos(theta) + ab[:, 1:] * np.sin(theta) + noise * rng.normal(size=(r, 10))
  return x - x.mean(1, keepdims=True)


def test_circumplex_structured_scores_beat_chance():
  sign, ref = causal.circumplex_reference()
  e = _by_metric(causal.agreement_with_chance(_circumplex_scores(0), np.zeros((10, 10)), sign, ref))["sign_agreement"]
  assert e["observed"] > 0.9 and e["null_percentile"] == 100 and e["ci"][0] > e["null_interval"][1]


def test_graph_figures_against_random_graphs_of_the_same_size():
  sign, ref = causal.circumplex_reference()
  x, n_pairs, k_ref = _noise(0), 45, 12
  iu = np.triu_indices(10, 1)
  for k in (5, 12, 20):
    prec, pct = [], []
    for seed in range(40):
      pick = np.random.default_rng(seed).choice(n_pairs, k, replace=False)
      g = np.zeros((10, 10), np.int8)
      g[iu[0][pick], iu[1][pick]] = -1
      m = _by_metric(causal.agreement_with_chance(x, g, sign, ref, n_null=500, n_boot=0, seed=seed))
      assert m["precision"]["chance"] == pytest.approx(k_ref / n_pairs, abs=0.03)
      assert m["recall"]["chance"] == pytest.approx(k / n_pairs, abs=0.03)
      assert m["shd"]["chance"] == pytest.approx(k + k_ref - 2 * k * k_ref / n_pairs, abs=0.5)
      prec.append(m["precision"]["observed"])
      pct.append(m["precision"]["null_percentile"])
    assert np.mean(prec) == pytest.approx(k_ref / n_pairs, abs=0.05)
    assert 30 < np.mean(pct) < 85
  m = _by_metric(causal.agreement_with_chance(x, np.where(ref, -1, 0), sign, ref, n_null=1000, n_boot=0))
  assert m["precision"]["observed"] == 1 and m["recall"]["observed"] == 1 and m["shd"]["observed"] == 0
  assert m["precision"]["null_percentile"] == 100 and m["recall"]["null_percentile"] == 100
  assert m["shd"]["null_percentile"] < 1                  # lower shd is better: ~0 % of random graphs do as well
  assert m["precision"]["null_interval"][1] < 1


def test_graph_bootstrap_ci_when_alpha_is_given():
  x, sk = _linear_gaussian(n=400, seed=2)
  g = causal.pc_graph(x, 0.01)
  sign = np.sign(np.corrcoef(x.T)).astype(np.int8) * sk
  out = _by_metric(causal.agreement_with_chance(x, g, sign, sk, n_null=200, n_boot=8, alpha=0.01, centre=False))
  lo, hi = out["recall"]["ci"]
  assert 0 <= lo <= hi <= 1 and hi == 1 and out["precision"]["observed"] == 1


def test_chance_levels_are_fast():
  import time
  sign, ref = causal.circumplex_reference()
  t = time.perf_counter()
  causal.agreement_with_chance(_noise(1), np.where(ref, -1, 0), sign, ref, n_null=1000, n_boot=1000)
  assert time.perf_counter() - t < 5


def test_reference_file_and_errors(tmp_path):
  vals = ("power", "security", "tradition")
  p = tmp_path / "ref.csv"
  p.write_text("security,power,tradition\n1,0.5,-0.1\n0.5,1,0.4\n-0.1,0.4,1\n")
  sign, sk = causal.reference_from_file(p, vals, edge_threshold=0.3)
  assert sign[0, 1] == 1 and sign[1, 2] == -1 and sk[0, 1] and not sk[1, 2] and sk[0, 2]
  p.write_text("power,kindness,tradition\n1,0,0\n0,1,0\n0,0,1\n")
  with pytest.raises(ValueError, match="header must name the values"):
    causal.reference_from_file(p, vals)
  with pytest.raises(ValueError, match="more roles than values"):
    causal.check_scores(np.random.randn(3, 3), vals)
  with pytest.raises(ValueError, match="alpha"):
    causal.pc_graph(np.random.randn(20, 3), 1.5)


def test_side_effects_and_role_ranking():
  g = np.zeros((3, 3), np.int8)
  g[0, 1], g[1, 0] = -1, 1                          # 0 -> 1
  out = causal.side_effects(np.asarray([0.5, 0.3, 0.01]), 0, g, threshold=0.1)
  assert out["predicted"] == [1] and out["observed"] == [1] and out["precision"] == 1
  delta = np.asarray([[0.5, 0.5, 0.5], [0.4, 0.0, 0.0], [-0.1, 0.0, 0.0]])
  assert causal.rank_roles(delta, 0).tolist() == [1, 0, 2]   # scores 0.4, 0.0, -0.1


# ----------------------------------------------------------------------------- SAEs

def _hand_sae():
  w_enc = jnp.asarray([[1.0, -1.0, 0.5], [0.0, 2.0, 1.0]])
  return sae_lib.SAE(w_enc, jnp.asarray([0.1, -0.2, 0.0]), jnp.asarray([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]),
                     jnp.asarray([0.5, -0.5]), jnp.asarray([0.3, 0.0, 1.0]))


def test_jumprelu_matches_its_definition_and_round_trips(tmp_path):
  s = _hand_sae()
  x = np.asarray([[1.0, 1.0], [0.2, -0.1], [-1.0, 2.0]])
  pre = x @ np.asarray(s.W_enc) + np.asarray(s.b_enc)
  want = np.where(pre > np.asarray(s.threshold), np.maximum(pre, 0), 0)
  np.testing.assert_allclose(np.asarray(s.encode(x)), want, atol=1e-6)
  np.testing.assert_allclose(np.asarray(s(x)), want @ np.asarray(s.W_dec) + np.asarray(s.b_dec), atol=1e-6)
  sae_lib.save_sae(tmp_path / "params.npz", s)
  back = sae_lib.load_sae(tmp_path / "params.npz")
  assert back.kind == "jumprelu"
  np.testing.assert_allclose(np.asarray(back(x)), np.asarray(s(x)), atol=1e-6)
  from safetensors.numpy import save_file
  save_file({n: np.asarray(getattr(s, n), np.float32) for n in sae_lib.ARRAYS}, str(tmp_path / "s.safetensors"))
  np.testing.assert_allclose(np.asarray(sae_lib.load_sae(tmp_path / "s.safetensors")(x)), np.asarray(s(x)), atol=1e-6)


def test_topk_keeps_k_latents():
  s = sae_lib.init_topk(jax.random.PRNGKey(0), 8, 32, 3)
  a = np.asarray(s.encode(np.random.RandomState(0).randn(5, 8)))
  assert ((a > 0).sum(-1) <= 3).all() and ((a > 0).sum(-1) >= 1).all()


def test_sae_errors(tmp_path):
  with pytest.raises(ValueError, match="width 2 but the model's layer 3 residual stream has width 64"):
    sae_lib.check_width(_hand_sae(), 64, layer=3)
  p = tmp_path / "bad.npz"
  np.savez(p, W_enc=np.zeros((2, 3)))
  with pytest.raises(ValueError, match="no b_enc, W_dec, b_dec arrays"):
    sae_lib.load_sae(p)


def test_trained_sae_recovers_planted_dictionary(tmp_path):
  rng = np.random.default_rng(0)
  d, f, k, n = 16, 24, 2, 20000
  atoms = rng.normal(size=(f, d))
  atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
  codes = np.zeros((n, f))
  for i in range(n):
    codes[i, rng.choice(f, k, replace=False)] = rng.uniform(1.0, 3.0, k)
  x = (codes @ atoms).astype(np.float32)
  s = sae_training.train(x, width=f, k=k, steps=1500, batch=256, lr=3e-3, seed=0, progress=False)
  cos = np.abs(atoms @ np.asarray(s.W_dec).T).max(1)          # best decoder row per planted atom
  assert np.mean(cos) > 0.9, cos
  q = sae_lib.quality(s, x)
  assert q["explained_variance"] > 0.8 and q["l0"] <= k + 0.5


def test_training_resumes_to_the_same_sae(tmp_path):
  x = np.random.default_rng(1).normal(size=(500, 8)).astype(np.float32)
  full = sae_training.train(x, width=16, k=2, steps=40, batch=32, seed=0, progress=False)
  sae_training.train(x, width=16, k=2, steps=20, batch=32, seed=0, ckpt_dir=tmp_path / "ck", ckpt_every=10, progress=False)
  resumed = sae_training.train(x, width=16, k=2, steps=40, batch=32, seed=0, ckpt_dir=tmp_path / "ck", ckpt_every=10,
                          progress=False)
  np.testing.assert_allclose(np.asarray(resumed.W_dec), np.asarray(full.W_dec), atol=1e-5)


def test_zero_coefficient_and_clamp_steering(tiny):
  cfg, params, tokens, mask = tiny
  s = sae_lib.init_topk(jax.random.PRNGKey(1), cfg.d_model, 32, 4)
  base, _, _ = model.forward(params, tokens, cfg, attention_mask=mask)
  vec = sae_lib.steering_vectors(s, 5, 1, cfg.n_layers)
  zero, _, _ = model.forward(params, tokens, cfg, attention_mask=mask, intervene=model.AddToResidual(vec, jnp.zeros(())))
  np.testing.assert_array_equal(np.asarray(zero), np.asarray(base))
  moved, _, _ = model.forward(params, tokens, cfg, attention_mask=mask, intervene=model.AddToResidual(vec, jnp.asarray(3.0)))
  assert np.abs(np.asarray(moved) - np.asarray(base)).max() > 1e-3
  clamp = sae_lib.ClampLatent(s, jnp.asarray(5), jnp.asarray(1), jnp.asarray(2.0))
  _, _, taps = model.forward(params, tokens, cfg, attention_mask=mask, intervene=clamp, taps=("resid_post",))
  # after the clamp the latent's pre-activation moved by (2 - a) * |W_dec row|-projected amount; check the edit itself
  _, _, taps0 = model.forward(params, tokens, cfg, attention_mask=mask, taps=("resid_post",))
  h0 = taps0["resid_post"][1]
  a0 = s.encode(h0)[..., 5]
  np.testing.assert_allclose(np.asarray(taps["resid_post"][1]),
                             np.asarray(h0 + (2.0 - a0)[..., None] * s.W_dec[5]), atol=1e-4)


def test_pc_on_centred_scores_caps_the_degenerate_conditioning_sets():
  """Row-centred scores sum to zero, so conditioning on all other columns is degenerate: PC
  must still run (no singular-matrix failure) and find the same skeleton as with max_k."""
  x, _ = _linear_gaussian(n=800, seed=1)
  centred = x - x.mean(1, keepdims=True)
  assert np.linalg.matrix_rank(centred - centred.mean(0)) == 4
  from causallearn.search.ConstraintBased.PC import pc
  want = pc(centred, 0.01, "fisherz", stable=True, show_progress=False, verbose=False, max_k=2).G.graph
  np.testing.assert_array_equal(causal.pc_graph(centred, 0.01), want)


def test_sae_clamp_steering_sets_the_latent(tiny):
  from valuedist.studies.causal import sae as causal_study
  cfg, params, tokens, mask = tiny
  s = sae_lib.init_topk(jax.random.PRNGKey(2), cfg.d_model, 16, 16)      # k = width: a plain ReLU SAE
  active = np.full(16, 0.5)
  iv, value = causal_study.sae_steering(s, 3, 1, 2.0, cfg.n_layers, 7.0, active, "clamp")
  assert value == 1.0
  _, _, taps = model.forward(params, tokens, cfg, attention_mask=mask, intervene=iv, taps=("resid_post", "resid_post:raw"))
  h0 = taps["resid_post:raw"][1]
  a0 = s.encode(h0)[..., 3]
  real = np.asarray(mask) > 0
  assert not real.all()
  got, want = np.asarray(taps["resid_post"][1]), np.asarray(h0 + (1.0 - a0)[..., None] * s.W_dec[3])
  np.testing.assert_allclose(got[real], want[real], atol=1e-4)
  np.testing.assert_array_equal(got[~real], np.asarray(h0)[~real])       # pads are never edited (edits.Where)
  iv, scale = causal_study.sae_steering(s, 3, 1, 2.0, cfg.n_layers, 7.0, active, "add")
  assert scale == 14.0 and isinstance(iv, model.AddToResidual)
