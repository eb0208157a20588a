"""ConVA gated minimal activation on a tiny random model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
np_logit = lambda p: np.log(p / (1 - p))

from valuedist.model import sampler, transformer as model
from valuedist.values import conva
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
  _, _, taps = model.forward(params, tokens, cfg, attention_mask=mask, taps=("resid_post",),
                             intervene=model.AddToResidual(deltas))
  h = np.asarray(taps["resid_post"][:, :, -1])                                 # [L, B, D]
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
                          intervene=model.AddToResidual(jnp.zeros_like(jnp.asarray(d))))
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


# ----------------------------------------------------------------------------- identification pieces

def test_value_probes_recover_planted_direction_per_layer_and_round_trip(tmp_path):
  rng = np.random.RandomState(0)
  n_layers, n, d = 3, 1000, 16
  u = rng.randn(n_layers, d)
  u /= np.linalg.norm(u, axis=-1, keepdims=True)
  x = rng.randn(n_layers, n, d).astype(np.float32)
  y = (rng.rand(n) < 0.5).astype(np.int32)
  x += (2 * y - 1)[None, :, None] * 3.0 * u[:, None, :]          # Bayes accuracy Phi(3) = 0.9987
  train, val, test = np.arange(600), np.arange(600, 800), np.arange(800, 1000)
  probe, acc_tr, acc_val, acc_te = conva.fit_value_probes(x, y, train, val, test, l2=1e-3)
  cos = np.sum(np.asarray(probe.direction()) * u, -1)
  assert (cos > 0.9).all(), cos
  assert (np.asarray(acc_te) > 0.98).all() and (np.asarray(acc_val) > 0.98).all()
  vp = conva.ValueProbes(probe.w[None], probe.b[None], acc_tr[None], acc_val[None], acc_te[None], values=("power",),
                         data_hash="abc")
  conva.save_value_probes(tmp_path / "p", vp)
  back = conva.load_value_probes(tmp_path / "p")
  assert back.values == ("power",) and back.data_hash == "abc"
  np.testing.assert_array_equal(np.asarray(back.w), np.asarray(vp.w))
  np.testing.assert_array_equal(np.asarray(back.val_acc), np.asarray(vp.val_acc))
  with pytest.raises(ValueError, match="no probe for value 'security'"):
    back.index("security")


def test_layer_choice_reads_validation_never_test_and_layer_ranges():
  val = np.asarray([0.5, 0.92, 0.95, 0.7, 0.6, 0.99, 0.99, 0.99, 0.99, 0.99])
  test = np.asarray([0.99, 0.5, 0.5, 0.99, 0.99, 0.5, 0.5, 0.5, 0.5, 0.5])   # test favours other layers
  layers, met = conva.choose_layers(val, threshold=0.9, exclude_last=5)
  assert layers == (1, 2) and met                         # last 5 excluded however good
  assert conva.choose_layers(test, 0.9, 5) != layers      # the rule is a function of its input only
  layers, met = conva.choose_layers(np.asarray([0.5, 0.6, 0.8, 0.7, 0.99, 0.99]), 0.9, 2)
  assert layers == (2,) and not met                       # none reaches 0.9: best allowed layer, flagged
  assert conva.parse_layers("2-4", 6) == (2, 4) and conva.parse_layers("5", 6) == (5, 5)
  np.testing.assert_array_equal(np.asarray(conva.layer_mask(range(2, 5), 6)), [0, 0, 1, 1, 1, 0])
  np.testing.assert_array_equal(np.asarray(conva.layer_mask((1, 4), 6)), [0, 1, 0, 0, 1, 0])
  for bad, match in (("4-9", "outside the model's layers 0-5"), ("x", "malformed"), ("3-1", "outside")):
    with pytest.raises(ValueError, match=match) as e:
      conva.parse_layers(bad, 6)
    assert "\n" not in str(e.value)


def test_mean_difference_and_gated_added_deltas():
  acts = jnp.asarray(np.random.RandomState(1).randn(2, 6, 3), jnp.float32)
  y = jnp.asarray([1, 0, 1, 0, 1, 0])
  v = conva.mean_difference(acts, y)
  np.testing.assert_allclose(np.asarray(v), np.asarray(acts[:, ::2].mean(1) - acts[:, 1::2].mean(1)), atol=1e-6)
  deltas = conva.added_deltas(v, jnp.asarray([0.0, 1.0]), jnp.asarray([1.0, 0.0, 1.0]), 2.0)
  assert deltas.shape == (3, 2, 3)
  np.testing.assert_allclose(np.asarray(deltas[0, 1]), 2 * np.asarray(v[1]), atol=1e-6)
  assert not np.asarray(deltas[1]).any() and not np.asarray(deltas[:, 0]).any()


def test_last_token_activations_are_the_residual_taps(tiny):
  cfg, params, tokens, mask = tiny
  acts = conva.last_token_activations(params, tokens, mask, cfg)
  _, _, taps = model.forward(params, tokens, cfg, attention_mask=mask, taps=("resid_post",))
  np.testing.assert_allclose(np.asarray(acts), np.asarray(taps["resid_post"][:, :, -1]), atol=1e-6)


def test_sampler_runs_the_edit_in_one_program(tiny):
  """Passing the edit itself to the sampler (deltas decided in its own prefill) equals adding
  the deltas found by a separate prefill pass, and the sampler reports the deltas it used."""
  cfg, params, tokens, mask = tiny
  edit = _edit(cfg, 0.999, [0, 1, 1], [1, 0, 1])
  deltas = conva.minimal_deltas(params, tokens, mask, edit, cfg)
  fused = sampler.generate(params, tokens, mask, cfg, max_new_tokens=6, intervene=edit)
  split = sampler.generate(params, tokens, mask, cfg, max_new_tokens=6, intervene=model.AddToResidual(deltas))
  np.testing.assert_array_equal(np.asarray(fused.tokens), np.asarray(split.tokens))
  np.testing.assert_allclose(np.asarray(fused.decode_intervention.vectors), np.asarray(deltas), atol=1e-6)
  plain = sampler.generate(params, tokens, mask, cfg, max_new_tokens=6)
  assert not np.array_equal(np.asarray(fused.tokens), np.asarray(plain.tokens))


def test_teacher_forced_scoring_applies_the_edit_as_generation_does(tiny):
  """Scoring a continuation under the ConVA edit decides the edit on the prompt (not on the
  last response token): the log-probs equal those under the fixed deltas of the prompt."""
  from valuedist.eval import likelihood as evaluation
  cfg, params, tokens, mask = tiny
  edit = _edit(cfg, 0.999, [0, 1, 1], [1, 1, 0])
  deltas = conva.minimal_deltas(params, tokens, mask, edit, cfg)
  resp = jnp.asarray(np.random.RandomState(3).randint(3, cfg.vocab_size, (3, 4)), jnp.int32)
  rmask = jnp.ones((3, 4), jnp.int32)
  got = evaluation.response_logprobs(params, cfg, tokens, mask, resp, rmask, edit)
  want = evaluation.response_logprobs(params, cfg, tokens, mask, resp, rmask, model.AddToResidual(deltas))
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  plain = evaluation.response_logprobs(params, cfg, tokens, mask, resp, rmask)
  assert np.abs(np.asarray(got) - np.asarray(plain)).max() > 1e-3


def test_per_row_fields_run_a_sweep_of_conditions_in_one_batch(tiny):
  """Three conditions (each its own probe, steered layers, target and mode) over the same
  prompts as one batch with every field given per row: the deltas equal each condition's own
  run and greedy generation gives each condition's tokens."""
  cfg, params, tokens, mask = tiny
  conds = [_edit(cfg, 0.999, [0, 1, 1], [1, 1, 1], seed=1), _edit(cfg, 0.9, [1, 1, 0], [1, 0, 1], seed=2),
           _edit(cfg, 0.2, [1, 0, 1], [1, 1, 1], remove=1.0, seed=3)]
  b = tokens.shape[0]
  per_row = conva.GatedMinimalActivation(*[jnp.concatenate([jnp.broadcast_to(getattr(c, f), (b,) + getattr(c, f).shape)
                                                            if f != "gate" else c.gate for c in conds])
                                           for f in ("w", "b", "steer", "s0", "gate", "remove")])
  assert per_row.w.shape == (3 * b, cfg.n_layers, cfg.d_model) and per_row.s0.shape == (3 * b,)
  big = (jnp.tile(tokens, (3, 1)), jnp.tile(mask, (3, 1)))
  np.testing.assert_allclose(np.asarray(conva.minimal_deltas(params, *big, per_row, cfg)),
                             np.concatenate([np.asarray(conva.minimal_deltas(params, tokens, mask, c, cfg)) for c in conds]),
                             atol=1e-5)
  together = sampler.generate(params, *big, cfg, max_new_tokens=5, intervene=per_row).tokens
  alone = [sampler.generate(params, tokens, mask, cfg, max_new_tokens=5, intervene=c).tokens for c in conds]
  np.testing.assert_array_equal(np.asarray(together), np.concatenate([np.asarray(t) for t in alone]))
