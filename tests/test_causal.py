"""Value scoring from option tokens, PC recovery, circumplex comparison, SAEs."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valuedist.eval import likelihood as evaluation
from valuedist.model import transformer as model
from valuedist.values import causal_graph as causal, questionnaire, sae as sae_lib
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
  assert ref.sum() == 2 * v and sign[0, 1] == 1 and sign[0, 5] == -1 and sign[0, 2] == 0
  corr = sign.astype(float)
  g = np.where(ref, -1, 0)
  a = causal.agreement(corr, g, sign, ref)
  assert a["sign_agreement"] == 1 and a["precision"] == 1 and a["recall"] == 1 and a["shd"] == 0
  a = causal.agreement(-corr, np.zeros((v, v)), sign, ref)
  assert a["sign_agreement"] == 0 and a["recall"] == 0 and a["shd"] == v


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
  s = sae_lib.train(x, width=f, k=k, steps=1500, batch=256, lr=3e-3, seed=0, progress=False)
  cos = np.abs(atoms @ np.asarray(s.W_dec).T).max(1)          # best decoder row per planted atom
  assert np.mean(cos) > 0.9, cos
  q = sae_lib.quality(s, x)
  assert q["explained_variance"] > 0.8 and q["l0"] <= k + 0.5


def test_training_resumes_to_the_same_sae(tmp_path):
  x = np.random.default_rng(1).normal(size=(500, 8)).astype(np.float32)
  full = sae_lib.train(x, width=16, k=2, steps=40, batch=32, seed=0, progress=False)
  sae_lib.train(x, width=16, k=2, steps=20, batch=32, seed=0, ckpt_dir=tmp_path / "ck", ckpt_every=10, progress=False)
  resumed = sae_lib.train(x, width=16, k=2, steps=40, batch=32, seed=0, ckpt_dir=tmp_path / "ck", ckpt_every=10,
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
  _, _, taps = model.forward(params, tokens, cfg, attention_mask=mask, intervene=clamp, taps=("residual",))
  # after the clamp the latent's pre-activation moved by (2 - a) * |W_dec row|-projected amount; check the edit itself
  _, _, taps0 = model.forward(params, tokens, cfg, attention_mask=mask, taps=("residual",))
  h0 = taps0["residual"][1]
  a0 = s.encode(h0)[..., 5]
  np.testing.assert_allclose(np.asarray(taps["residual"][1]),
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
  _, _, taps = model.forward(params, tokens, cfg, attention_mask=mask, intervene=iv, taps=("residual", "block_out"))
  h0 = taps["block_out"][1]
  a0 = s.encode(h0)[..., 3]
  np.testing.assert_allclose(np.asarray(taps["residual"][1]), np.asarray(h0 + (1.0 - a0)[..., None] * s.W_dec[3]),
                             atol=1e-4)
  iv, scale = causal_study.sae_steering(s, 3, 1, 2.0, cfg.n_layers, 7.0, active, "add")
  assert scale == 14.0 and isinstance(iv, model.AddToResidual)
