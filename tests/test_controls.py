"""Matched random-direction controls (STUDY_PROTOCOL rule 7): same norms, same sites, random directions."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valuedist.model import sampler, transformer as model
from valuedist.values import controls, conva
from tests import hf_tiny
from tests.test_conva import _edit as conva_edit
from tests.test_gap import _edit as anchor_edit, _final_hidden, make_anchors


@pytest.fixture(scope="module")
def tiny():
  _, cfg, params = hf_tiny.build("llama")
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(0), cfg.vocab_size, [9, 6, 4])
  return cfg, jax.tree.map(jnp.asarray, params), jnp.asarray(tokens), jnp.asarray(mask)


def test_random_directions_are_unit_seeded_and_distinct():
  a = np.asarray(controls.random_directions(0, 3, (4, 64)))
  np.testing.assert_allclose(np.linalg.norm(a, axis=-1), 1.0, rtol=1e-6)
  np.testing.assert_array_equal(a, np.asarray(controls.random_directions(0, 3, (4, 64))))
  for other in (controls.random_directions(0, 4, (4, 64)), controls.random_directions(1, 3, (4, 64))):
    assert np.abs(np.asarray(other) - a).max() > 0.1
  # isotropic: nearly orthogonal to any fixed direction in high dimension
  b = np.asarray(controls.random_directions(0, 0, (200, 512)))
  assert np.abs(b @ (np.ones(512) / np.sqrt(512))).mean() < 0.1


def test_matched_norm_keeps_every_norm_and_zero_edits():
  rng = np.random.RandomState(0)
  deltas = rng.normal(size=(3, 4, 16)).astype(np.float32)
  deltas[1, 2] = 0.0                                              # an unedited layer of one row
  dirs = controls.random_directions(0, 0, (4, 16))
  out = np.asarray(controls.matched_norm(jnp.asarray(deltas), dirs))
  np.testing.assert_allclose(np.linalg.norm(out, axis=-1), np.linalg.norm(deltas, axis=-1), rtol=1e-5)
  np.testing.assert_array_equal(out[1, 2], 0.0)
  cos = np.einsum("bld,ld->bl", out, np.asarray(dirs)) / np.maximum(np.linalg.norm(out, axis=-1), 1e-12)
  np.testing.assert_allclose(cos[np.linalg.norm(deltas, axis=-1) > 0], 1.0, rtol=1e-5)
  caa = rng.normal(size=(4, 16)).astype(np.float32)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(controls.matched_caa(jnp.asarray(caa), dirs)), axis=-1),
                             np.linalg.norm(caa, axis=-1), rtol=1e-5)


def test_conva_control_has_the_methods_norms_on_the_same_prompts(tiny):
  """The control's edit per prompt and layer has the norm ConVA decides on that prompt (gated-off
  prompts and unsteered layers stay zero), along the random directions, and it generates
  through the same sampler program."""
  cfg, params, tokens, mask = tiny
  edit = conva_edit(cfg, 0.999, [0, 1, 1], [1, 0, 1])
  dirs = controls.random_directions(0, 1, (cfg.n_layers, cfg.d_model))
  method = np.asarray(conva.minimal_deltas(params, tokens, mask, edit, cfg))
  ctrl = controls.MatchedConVA(edit, dirs).on(params, tokens, mask, cfg)
  v = np.asarray(ctrl.vectors)
  np.testing.assert_allclose(np.linalg.norm(v, axis=-1), np.linalg.norm(method, axis=-1), rtol=1e-5, atol=1e-6)
  assert np.all(v[1] == 0) and np.all(v[:, 0] == 0) and np.abs(v[0, 1:]).max() > 0
  np.testing.assert_allclose(v[0, 1] / np.linalg.norm(v[0, 1]), np.asarray(dirs[1]), atol=1e-5)
  # not the method's direction: nearly orthogonal to the probe's w
  w = np.asarray(edit.w[1])
  assert abs(v[0, 1] @ w) / (np.linalg.norm(v[0, 1]) * np.linalg.norm(w)) < 0.5
  steered = sampler.generate(params, tokens, mask, cfg, max_new_tokens=4, intervene=ctrl)
  np.testing.assert_allclose(np.asarray(steered.decode_intervention.vectors), v)


def test_anchor_edit_control_keeps_the_per_position_norm(tiny):
  """At every position the control moves h by the norm the anchor edit would, along one fixed
  random direction; gated-off rows stay untouched."""
  cfg, params, _, _ = tiny
  anchors = make_anchors(cfg.vocab_size)
  h = _final_hidden(params, cfg)
  edit = anchor_edit(params, cfg, anchors, mode="step", alpha=0.5)
  d = controls.random_directions(0, 0, (cfg.d_model,))
  method = np.asarray(edit.edit("final", h, None) - h)
  ctrl = np.asarray(edit.replace(control=d).edit("final", h, None) - h)
  np.testing.assert_allclose(np.linalg.norm(ctrl, axis=-1), np.linalg.norm(method, axis=-1), rtol=1e-4)
  unit = ctrl / np.linalg.norm(ctrl, axis=-1, keepdims=True)
  np.testing.assert_allclose(unit, np.broadcast_to(np.asarray(d), unit.shape), atol=1e-5)
  gated = np.asarray(edit.replace(control=d, gate=jnp.asarray([1.0, 0.0])).edit("final", h, None) - h)
  np.testing.assert_allclose(gated[0], ctrl[0], atol=1e-6)
  np.testing.assert_array_equal(gated[1], 0.0)
