"""Teacher-forced NLL / perplexity against PyTorch, diversity metrics, bootstrap statistics."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from valuedist.eval import likelihood, stats, text_metrics
from valuedist.model import transformer as model
from tests import hf_tiny


def _right_padded(rng, vocab, lengths, pad_id=0):
  t = max(lengths)
  tokens = np.full((len(lengths), t), pad_id, np.int64)
  mask = np.zeros((len(lengths), t), np.int64)
  for i, n in enumerate(lengths):
    tokens[i, :n] = rng.randint(3, vocab, n)
    mask[i, :n] = 1
  return tokens, mask


def _torch_nll(hf_model, prompt, response):
  """Summed NLL of `response` after `prompt` (one unpadded row), in float64 from torch logits."""
  ids = torch.tensor([list(prompt) + list(response)])
  with torch.no_grad():
    logits = hf_model(ids).logits[0].double()
  logp = torch.log_softmax(logits, -1)
  p = len(prompt)
  return -sum(float(logp[p - 1 + j, tok]) for j, tok in enumerate(response))


@pytest.mark.parametrize("variant", ["llama", "gemma2"])
def test_response_nll_and_perplexity_match_torch(variant):
  hf_model, cfg, params = hf_tiny.build(variant)
  params = jax.tree.map(jnp.asarray, params)
  rng = np.random.RandomState(0)
  p_tok, p_mask = hf_tiny.left_padded_batch(rng, cfg.vocab_size, [6, 2, 4])
  r_tok, r_mask = _right_padded(rng, cfg.vocab_size, [5, 7, 1])
  nll, n = likelihood.response_nll(params, cfg, p_tok, p_mask, r_tok, r_mask)
  ppl = likelihood.perplexity(params, cfg, p_tok, p_mask, r_tok, r_mask)
  np.testing.assert_array_equal(n, [5, 7, 1])
  for i in range(3):
    want = _torch_nll(hf_model, p_tok[i][p_mask[i] > 0], r_tok[i][r_mask[i] > 0])
    np.testing.assert_allclose(float(nll[i]), want, rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(float(ppl[i]), np.exp(want / n[i]), rtol=1e-4)
  lp = likelihood.response_logprobs(params, cfg, p_tok, p_mask, r_tok, r_mask)
  assert lp.shape == r_tok.shape and float(jnp.abs(lp[2, 1:]).max()) == 0.0


def test_empty_response_and_prompt_and_intervention():
  _, cfg, params = hf_tiny.build("llama")
  rng = np.random.RandomState(1)
  p_tok, p_mask = hf_tiny.left_padded_batch(rng, cfg.vocab_size, [3, 3])
  p_mask[1] = 0                                   # an empty prompt: its first response token has no context
  r_tok, r_mask = _right_padded(rng, cfg.vocab_size, [4, 4])
  r_mask[0] = 0
  nll, n = likelihood.response_nll(params, cfg, p_tok, p_mask, r_tok, r_mask)
  np.testing.assert_array_equal(n, [0, 3])
  assert float(nll[0]) == 0.0
  ppl = likelihood.perplexity(params, cfg, p_tok, p_mask, r_tok, r_mask)
  assert np.isnan(float(ppl[0])) and np.isfinite(float(ppl[1]))
  zero = model.AddToResidual(jnp.zeros((cfg.n_layers, cfg.d_model)))
  push = model.AddToResidual(jnp.ones((cfg.n_layers, cfg.d_model)))
  base = likelihood.response_nll(params, cfg, p_tok, p_mask, r_tok, r_mask)[0]
  np.testing.assert_allclose(likelihood.response_nll(params, cfg, p_tok, p_mask, r_tok, r_mask, zero)[0], base)
  assert not np.allclose(likelihood.response_nll(params, cfg, p_tok, p_mask, r_tok, r_mask, push)[0], base)


def test_distinct_n_hand_examples():
  lists = [[1, 2, 3], [1, 2, 4]]
  assert text_metrics.distinct_n(lists, 1) == pytest.approx(4 / 6)
  assert text_metrics.distinct_n(lists, 2) == pytest.approx(3 / 4)          # (1,2) twice, (2,3), (2,4)
  assert text_metrics.distinct_n(lists + [[9]], 2) == pytest.approx(3 / 4)  # too short: no bigrams
  assert text_metrics.distinct_n([np.array([5, 5, 5, 5])], 1) == pytest.approx(1 / 4)
  assert text_metrics.distinct_n([], 2) == 0.0 and text_metrics.distinct_n([[1]], 2) == 0.0
  with pytest.raises(ValueError, match="n must be >= 1"):
    text_metrics.distinct_n(lists, 0)


def test_repetition_and_degeneracy():
  assert text_metrics.repetition_rate([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(1 - 2 / 5)
  assert text_metrics.repetition_rate([1, 2, 3], n=4) == 0.0
  loop = [7, 8, 9, 10] * 5
  assert text_metrics.is_degenerate(loop) and text_metrics.is_degenerate([])
  assert text_metrics.is_degenerate([4] * 10)
  varied = list(range(20))
  assert not text_metrics.is_degenerate(varied)
  assert text_metrics.is_degenerate(varied[:3], min_len=4)
  assert not text_metrics.is_degenerate([1, 2, 3, 4, 1, 2, 3, 4, 5, 6])    # one repeat is not a loop


def test_bootstrap_ci_contains_truth_and_is_deterministic():
  v = np.random.default_rng(0).normal(1.0, 2.0, 4000)
  m, lo, hi = stats.bootstrap_ci(v, n=1000, seed=3)
  assert lo < 1.0 < hi and lo < m < hi
  se = v.std(ddof=1) / np.sqrt(len(v))
  assert hi - lo == pytest.approx(2 * 1.96 * se, rel=0.15)
  assert stats.bootstrap_ci(v, n=1000, seed=3) == (m, lo, hi)
  assert stats.bootstrap_ci(v, n=1000, seed=4) != (m, lo, hi)
  assert all(isinstance(x, float) for x in (m, lo, hi))
  with pytest.raises(ValueError, match="non-empty 1-D"):
    stats.bootstrap_ci([])
  with pytest.raises(ValueError, match="non-finite"):
    stats.bootstrap_ci([1.0, np.nan])


def test_bootstrap_diff_and_cohens_d():
  rng = np.random.default_rng(1)
  a, b = rng.normal(0.5, 1.0, 2000), rng.normal(0.0, 1.0, 1500)
  d, lo, hi = stats.bootstrap_diff_ci(a, b, n=1000, seed=0)
  assert d == pytest.approx(a.mean() - b.mean()) and lo < 0.5 < hi and lo > 0
  assert stats.bootstrap_diff_ci(a, b, n=1000, seed=0) == (d, lo, hi)
  # paired: a shared per-row offset cancels, so the paired interval is much narrower
  base = rng.normal(0, 5, 500)
  x, y = base + 0.2 + rng.normal(0, 0.1, 500), base + rng.normal(0, 0.1, 500)
  pd, plo, phi = stats.bootstrap_diff_ci(x, y, n=1000, paired=True)
  _, ilo, ihi = stats.bootstrap_diff_ci(x, y, n=1000)
  assert plo < pd < phi and (phi - plo) < 0.1 * (ihi - ilo)
  assert phi - plo == pytest.approx(2 * 1.96 * (x - y).std(ddof=1) / np.sqrt(500), rel=0.15)
  with pytest.raises(ValueError, match="equal lengths"):
    stats.bootstrap_diff_ci(a, b, paired=True)
  assert stats.cohens_d([1, 2, 3], [2, 3, 4]) == pytest.approx(-1.0)
  assert stats.cohens_d(a, b) == pytest.approx(0.5, abs=0.1)


def test_paired_bootstrap_equals_a_direct_computation():
  t = np.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
  c = np.array([0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
  strata = np.array(["b", "a", "b", "a", "a", "b"])
  r = stats.paired_bootstrap(t, c, strata=strata, n=500, seed=7)
  # the same resampling written out directly: stratum 'a' then 'b', items drawn within each
  rng = np.random.default_rng(7)
  d = t - c
  means = np.zeros(500)
  for label in ("a", "b"):
    rows = np.flatnonzero(strata == label)
    for k, draw in enumerate(rng.integers(0, len(rows), (500, len(rows)))):
      means[k] += d[rows[draw]].sum()
  means /= len(d)
  assert r["estimate"] == pytest.approx(d.mean())
  assert r["ci"] == pytest.approx(list(np.quantile(means, [0.025, 0.975])))
  flips = rng.choice(np.array([-1.0, 1.0]), size=(500, len(d)))
  p = (1 + np.count_nonzero(np.abs((flips * d).mean(1)) >= abs(d.mean()) - 1e-12)) / 501
  assert r["p"] == pytest.approx(p) and r["n"] == 6
  # every resample keeps each stratum's size: a constant difference per stratum has no spread
  r = stats.paired_bootstrap(np.array([1.0, 1.0, 3.0, 3.0]), np.zeros(4), strata=[0, 0, 1, 1], n=200, seed=0)
  assert r["ci"] == pytest.approx([2.0, 2.0])


def test_paired_bootstrap_covers_a_known_difference_at_the_nominal_rate():
  rng = np.random.default_rng(0)
  covered, rejected = [], []
  for sim in range(300):
    item = rng.normal(0, 1, 60)                       # shared item effect: pairing matters
    t, c = item + 0.3 + rng.normal(0, 0.5, 60), item + rng.normal(0, 0.5, 60)
    r = stats.paired_bootstrap(t, c, strata=np.arange(60) % 3, n=400, seed=sim)
    covered.append(r["ci"][0] <= 0.3 <= r["ci"][1])
    null = stats.paired_bootstrap(c + rng.normal(0, 0.5, 60), c, n=400, seed=sim)
    rejected.append(null["p"] < 0.05)
  assert 0.90 <= np.mean(covered) <= 0.99
  assert np.mean(rejected) <= 0.09                  # p-values of a true null: ~5% below 0.05


def test_holm_and_comparison_rows():
  adj = stats.holm([0.01, 0.04, 0.03, 0.5])
  assert adj == pytest.approx([0.04, 0.09, 0.09, 0.5])
  rows = stats.with_holm([stats.comparison("m", f"t{k}", "none", [1.0, 1.0, 0.0], [0.0, 1.0, 0.0], seed=k)
                          for k in range(3)])
  assert set(rows[0]) == {"metric", "treatment", "control", "estimate", "ci", "p", "p_holm", "n", "paired"}
  assert all(r["paired"] and r["p_holm"] >= r["p"] and r["n"] == 3 for r in rows)
  with pytest.raises(ValueError, match="equal lengths"):
    stats.paired_bootstrap([1.0, 2.0], [1.0], seed=0)
