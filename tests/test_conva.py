"""ConVA gated minimal activation on a tiny random model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
np_logit = lambda p: np.log(p / (1 - p))

from valuedist import conva, model, sampler
from tests import hf_tiny


@pytest.fixture(scope="module")
def tiny():
  _, cfg, params = hf_tiny.build("llama")
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(0), cfg.vocab_size, [9, 6, 4])
  return cfg, jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), jnp.asarray(mask)


def _edit(cfg, p0, steer, gate, remove=0.0, seed=0):
  w = jax.random.normal(jax.random.PRNGKey(seed), (cfg.n_layers, cfg.d_model))
  b = jnp.linspace(-0.5, 0.5, cfg.n_layers)
  return conva.GatedMinimalActivation(w, b, jnp.asarray(steer, jnp.float32),
                                      jnp.asarray(np_logit(p0), jnp.float32), jnp.asarray(gate, jnp.float32),
                                      jnp.asarray(remove, jnp.float32))


def _probe_probs(cfg, params, tokens, mask, edit, deltas):
  _, _, taps = model.forward(params, tokens, cfg, attention_mask=mask, taps=("residual",),
                             intervene=conva.steering_intervention(deltas))
  h = np.asarray(taps["residual"][:, :, -1])                                 # [L, B, D]
  return 1 / (1 + np.exp(-(np.einsum("lbd,ld->lb", h, np.asarray(edit.w)) + np.asarray(edit.b)[:, None])))


def test_probe_reads_exactly_p0_after_the_edit(tiny):
  cfg, params, tokens, mask = tiny
  p0 = 0.999                                   # above what the random probes read: every layer is edited
  edit = _edit(cfg, p0, [0, 1, 1], [1, 1, 1])
  deltas = conva.minimal_deltas(params, tokens, mask, edit, cfg)
  probs = _probe_probs(cfg, params, tokens, mask, edit, deltas)
  np.testing.assert_allclose(probs[1:], p0, atol=1e-5)
  assert np.all(np.asarray(deltas[:, 0]) == 0)
  # minimal: the edit is along w only
  w1 = np.asarray(edit.w[1])
  d1 = np.asarray(deltas[:, 1])
  np.testing.assert_allclose(np.abs(d1 @ w1) / np.linalg.norm(w1), np.linalg.norm(d1, axis=-1), rtol=1e-5)


def test_zero_where_probe_already_reads_p0_and_gate_off(tiny):
  cfg, params, tokens, mask = tiny
  low = _edit(cfg, 1e-6, [1, 1, 1], [1, 1, 1])       # every probe already reads more than p0
  np.testing.assert_array_equal(np.asarray(conva.minimal_deltas(params, tokens, mask, low, cfg)), 0.0)
  gated = _edit(cfg, 0.999, [1, 1, 1], [1, 0, 1])
  d = np.asarray(conva.minimal_deltas(params, tokens, mask, gated, cfg))
  assert np.all(d[1] == 0) and np.abs(d[0]).max() > 0
  base = sampler.generate(params, tokens, mask, cfg, max_new_tokens=5)
  zero = sampler.generate(params, tokens, mask, cfg, max_new_tokens=5,
                          intervene=conva.steering_intervention(jnp.zeros_like(jnp.asarray(d))))
  np.testing.assert_array_equal(np.asarray(base.tokens), np.asarray(zero.tokens))


def test_remove_mode_pushes_down_to_p0(tiny):
  cfg, params, tokens, mask = tiny
  p0 = 1e-4
  edit = _edit(cfg, p0, [1, 1, 1], [1, 1, 1], remove=1.0)
  deltas = conva.minimal_deltas(params, tokens, mask, edit, cfg)
  np.testing.assert_allclose(_probe_probs(cfg, params, tokens, mask, edit, deltas), p0, rtol=1e-3)


def test_p0_outside_unit_interval_is_an_error():
  for bad in (0.0, 1.0, 1.5):
    with pytest.raises(ValueError, match="outside"):
      conva.check_p0(bad)
