"""Linear probes (L-BFGS logistic regression, heads, batched), splits, errors, pooled judge features."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valuedist.eval import judges
from valuedist.model import transformer as model
from valuedist.values import probes
from tests import hf_tiny

D, N = 12, 300


def _planted(seed=0, n=N, d=D, margin=0.1):
  """Separable data: y = [x.u > 0], points within `margin` of the boundary dropped."""
  rng = np.random.default_rng(seed)
  u = rng.normal(size=d)
  u /= np.linalg.norm(u)
  x = rng.normal(size=(2 * n, d)).astype(np.float32)
  x = x[np.abs(x @ u) > margin][:n]
  return x, (x @ u > 0).astype(np.int32), u


def _cos(w, u):
  w = np.asarray(w)
  return float(w @ u / np.linalg.norm(w))


def test_recovers_planted_direction_and_converges():
  x, y, u = _planted()
  tr, te = probes.split_train_test(len(y), test_frac=0.3, seed=0)
  p = probes.fit_logistic(x[tr], y[tr], name="v", layer=3)
  assert _cos(p.w, u) > 0.95
  assert float(probes.accuracy(p, x[te], y[te])) >= 0.97
  assert int(p.steps) < 500 and float(p.grad_norm) < 1e-6
  assert p.w.shape == (D,) and p.b.shape == () and p.w.dtype == jnp.float32
  assert (p.name, p.layer, p.l2) == ("v", 3, 1e-3)
  np.testing.assert_allclose(p.prob(x[:5]), jax.nn.sigmoid(x[:5] @ p.w + p.b), rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(p.direction()), 1.0, rtol=1e-6)


def test_batched_and_heads_equal_individual_fits():
  data = [_planted(seed) for seed in range(3)]
  xs, ys = np.stack([d[0] for d in data]), np.stack([d[1] for d in data])
  batched = probes.fit_logistic_batched(xs, ys)
  assert batched.w.shape == (3, D) and batched.b.shape == (3,)
  # heads: three label sets over one x (the first data set's x, labels from each planted u)
  heads_y = np.stack([(xs[0] @ d[2] > 0).astype(np.int32) for d in data], 1)
  heads = probes.fit_logistic_heads(xs[0], heads_y)
  assert heads.w.shape == (3, D) and heads.logit(xs[0]).shape == (N, 3)
  for g in range(3):
    one = probes.fit_logistic(xs[g], ys[g])
    np.testing.assert_allclose(batched.w[g], one.w, atol=1e-4)
    np.testing.assert_allclose(batched.b[g], one.b, atol=1e-4)
    one_head = probes.fit_logistic(xs[0], heads_y[:, g])
    np.testing.assert_allclose(heads.w[g], one_head.w, atol=1e-4)
    assert _cos(heads.w[g], data[g][2]) > 0.9
  acc = jax.vmap(probes.accuracy)(batched, jnp.asarray(xs), jnp.asarray(ys))
  assert acc.shape == (3,) and float(acc.min()) > 0.97
  assert probes.accuracy(heads, xs[0], heads_y).shape == (3,)


def test_l2_shrinks_norm():
  x, y, _ = _planted()
  norms = [float(jnp.linalg.norm(probes.fit_logistic(x, y, l2=l2).w)) for l2 in (1e-3, 1e-2, 1e-1, 1.0)]
  assert all(a > b for a, b in zip(norms, norms[1:])), norms


def test_standardisation_is_folded_into_w_and_b():
  x, y, u = _planted(seed=1)
  scale = np.geomspace(0.01, 100, D).astype(np.float32)
  raw = x * scale + 7.0
  p = probes.fit_logistic(raw, y, standardize=True)
  z = (raw - raw.mean(0)) / raw.std(0)
  pz = probes.fit_logistic(z, y)
  np.testing.assert_allclose(p.logit(raw), pz.logit(z), atol=2e-3, rtol=1e-3)
  judge = judges.fit_text_classifier(raw, y)
  assert judge.w.shape == (D,) and float(probes.accuracy(judge, raw, y)) > 0.97


def test_fit_inside_jit_matches_eager():
  x, y, _ = _planted(n=120)
  eager = probes.fit_logistic(x, y)
  w = jax.jit(lambda a, b: probes.fit_logistic(a, b).w)(x, y)
  np.testing.assert_allclose(w, eager.w, atol=1e-5)


def test_split_is_deterministic_disjoint_and_stratified():
  tr, te = probes.split_train_test(10, test_frac=0.3, seed=4)
  tr2, te2 = probes.split_train_test(10, test_frac=0.3, seed=4)
  np.testing.assert_array_equal(te, te2)
  assert len(te) == 3 and sorted(np.concatenate([tr, te]).tolist()) == list(range(10))
  assert not np.array_equal(te, probes.split_train_test(10, test_frac=0.3, seed=5)[1])
  labels = np.array([0] * 18 + [1] * 2)
  tr, te = probes.split_train_test(20, test_frac=0.3, seed=0, labels=labels)
  assert set(labels[te]) == {0, 1} and set(labels[tr]) == {0, 1}


@pytest.mark.parametrize("x, y, match", [
    (np.ones((4, 3)), np.ones(4), "single class"),
    (np.ones((4, 3)), np.array([0, 1, 0]), "4 rows but y has 3"),
    (np.ones((0, 3)), np.zeros(0), "empty"),
    (np.array([[0.0, np.nan], [1.0, 2.0]]), np.array([0, 1]), "non-finite"),
    (np.ones((2, 3)), np.array([0, 2]), "only 0 and 1"),
])
def test_errors_are_one_line(x, y, match):
  with pytest.raises(ValueError, match=match) as e:
    probes.fit_logistic(x, y)
  assert "\n" not in str(e.value)


def test_batched_errors_name_the_problem():
  x = np.random.default_rng(0).normal(size=(2, 4, 3))
  with pytest.raises(ValueError, match="problem 1"):
    probes.fit_logistic_batched(x, np.array([[0, 1, 0, 1], [1, 1, 1, 1]]))
  with pytest.raises(ValueError, match=r"need x \[G, N, D\]"):
    probes.fit_logistic_batched(x[0], np.array([0, 1, 0, 1]))
  with pytest.raises(ValueError, match="at least 2"):
    probes.split_train_test(1)


# ----------------------------------------------------------------------------- pooled features

@pytest.fixture(scope="module")
def tiny():
  _, cfg, params = hf_tiny.build("llama")
  params = jax.tree.map(jnp.asarray, params)
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(0), cfg.vocab_size, [7, 3, 5])
  return cfg, params, jnp.asarray(tokens), jnp.asarray(mask)


def test_pool_hidden_equals_manual_from_taps(tiny):
  cfg, params, tokens, mask = tiny
  _, _, taps = model.forward(params, tokens, cfg, attention_mask=mask, taps=("resid_post",), logits=False)
  res = np.asarray(taps["resid_post"])                     # [L, B, T, D]
  m = np.asarray(mask, np.float32)
  manual_mean = (res * m[None, :, :, None]).sum(2) / m.sum(1)[None, :, None]
  for layer in (0, 1, -1):
    got = judges.pool_hidden(params, cfg, tokens, mask, layer=layer)
    assert got.shape == (3, cfg.d_model) and got.dtype == jnp.float32
    np.testing.assert_allclose(got, manual_mean[layer], atol=1e-5)
    np.testing.assert_allclose(judges.pool_hidden(params, cfg, tokens, mask, layer=layer, how="last"),
                               res[layer, :, -1], atol=1e-5)
  np.testing.assert_allclose(judges.pool_hidden(params, cfg, tokens, mask, layer=None), manual_mean, atol=1e-5)
  # a padded row equals the same text alone
  alone = judges.pool_hidden(params, cfg, tokens[1:2, -3:], mask[1:2, -3:])
  np.testing.assert_allclose(alone[0], manual_mean[-1, 1], atol=1e-5)
  # skip_first: the first real token of each row is left out of the mean (one-token rows keep it)
  m2 = m.copy()
  m2[np.arange(3), np.argmax(m, 1)] = 0
  want = (res * m2[None, :, :, None]).sum(2) / m2.sum(1)[None, :, None]
  np.testing.assert_allclose(judges.pool_hidden(params, cfg, tokens, mask, layer=None, skip_first=True), want, atol=1e-5)
  one = judges.pool_hidden(params, cfg, tokens[1:2, -1:], mask[1:2, -1:], skip_first=True)
  np.testing.assert_allclose(one, judges.pool_hidden(params, cfg, tokens[1:2, -1:], mask[1:2, -1:]), atol=1e-6)
  with pytest.raises(ValueError, match="pooling 'max' is unknown"):
    judges.pool_hidden(params, cfg, tokens, mask, how="max")
  with pytest.raises(ValueError, match="out of range"):
    judges.pool_hidden(params, cfg, tokens, mask, layer=cfg.n_layers)


def test_text_classifier_on_pooled_features(tiny):
  cfg, params, _, _ = tiny
  rng = np.random.RandomState(1)
  # class 1 texts end in a marker token (random weights: read it early, at layer 0)
  tokens, mask = hf_tiny.left_padded_batch(rng, cfg.vocab_size, list(rng.randint(4, 9, 40)))
  y = np.arange(40) % 2
  tokens[(y == 0)[:, None] & (tokens == 5)] = 6
  tokens[y == 1, -2:] = 5
  feats = judges.pool_hidden(params, cfg, jnp.asarray(tokens), jnp.asarray(mask), layer=0, how="last")
  tr, te = probes.split_train_test(40, seed=0, labels=y)
  judge = judges.fit_text_classifier(feats[tr], y[tr])
  assert float(probes.accuracy(judge, feats[te], y[te])) == 1.0
  assert judge.prob(feats).shape == (40,)


def test_layer_accuracies_find_the_informative_layer():
  rng = np.random.RandomState(0)
  n, d = 400, 8
  y = (rng.rand(n) < 0.5).astype(np.int32)
  x = rng.randn(3, n, d).astype(np.float32)
  x[1, :, 0] += 4.0 * (2 * y - 1)                    # only layer 1 carries the label
  acc = judges.layer_accuracies(x, y, np.arange(300), np.arange(300, n))
  assert acc.shape == (3,) and int(np.argmax(acc)) == 1 and acc[1] > 0.95 and max(acc[0], acc[2]) < 0.7
