"""Gap statistics, anchor mapping and anchor-word editing on tiny random models."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valuedist.model import sampler, transformer as model
from valuedist.values import anchor_edit as steering, gap
from valuedist.values.anchors import Anchors, build_anchors
from tests import hf_tiny


def make_anchors(vocab, groups=2, k=5, seed=0):
  rng = np.random.RandomState(seed)
  ids = np.zeros((groups, 2, k), np.int32)
  mask = np.zeros((groups, 2, k), bool)
  for g in range(groups):
    chosen = rng.choice(vocab, 2 * k, replace=False)
    n_pos, n_neg = k, k - g               # unequal sides exercise the padding mask
    ids[g, 0, :n_pos], ids[g, 1, :n_neg] = chosen[:n_pos], chosen[k:k + n_neg]
    mask[g, 0, :n_pos], mask[g, 1, :n_neg] = True, True
  return Anchors(jnp.asarray(ids), jnp.asarray(mask), tuple(f"lex{g}" for g in range(groups)))


def numpy_gaps(z, anchors):
  out = {v: np.zeros(z.shape[:-1] + (anchors.size,)) for v in gap.VARIANTS}
  for g in range(anchors.size):
    pos = np.asarray(anchors.ids[g, 0])[np.asarray(anchors.mask[g, 0])]
    neg = np.asarray(anchors.ids[g, 1])[np.asarray(anchors.mask[g, 1])]
    zp, zn = z[..., pos].astype(np.float64), z[..., neg].astype(np.float64)
    lse = lambda a: np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1)) + a.max(-1)
    out["mean"][..., g] = zp.mean(-1) - zn.mean(-1)
    out["max"][..., g] = zp.max(-1) - zn.max(-1)
    out["lse"][..., g] = lse(zp) - lse(zn)
    out["normalised"][..., g] = out["mean"][..., g] / z.astype(np.float64).std(-1)
  return out


@pytest.fixture(scope="module")
def tiny():
  _, cfg, params = hf_tiny.build("llama")
  return cfg, jax.tree.map(jnp.asarray, params)


def test_gap_equals_numpy_from_logits():
  z = np.random.RandomState(0).randn(3, 4, 50).astype(np.float32) * 3
  anchors = make_anchors(50)
  got = gap.gap_from_logits(jnp.asarray(z), anchors)
  want = numpy_gaps(z, anchors)
  for v in gap.VARIANTS:
    np.testing.assert_allclose(np.asarray(got[v]), want[v], rtol=1e-5, atol=1e-5)


def test_normalised_gap_is_scale_invariant():
  z = jnp.asarray(np.random.RandomState(1).randn(2, 60).astype(np.float32))
  anchors = make_anchors(60)
  a, b = gap.gap_from_logits(z, anchors), gap.gap_from_logits(3.7 * z, anchors)
  np.testing.assert_allclose(np.asarray(a["normalised"]), np.asarray(b["normalised"]), rtol=1e-5)
  np.testing.assert_allclose(3.7 * np.asarray(a["mean"]), np.asarray(b["mean"]), rtol=1e-5)


def test_fast_path_without_vocab_projection_equals_full_logits(tiny):
  cfg, params = tiny
  anchors = make_anchors(cfg.vocab_size, groups=3)
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(2), cfg.vocab_size, [8, 5])
  stats = gap.unembed_stats(params, anchors, cfg)
  fast = gap.teacher_forced_gaps(params, jnp.asarray(tokens), jnp.asarray(mask), anchors, stats, cfg)
  full = gap.teacher_forced_gaps(params, jnp.asarray(tokens), jnp.asarray(mask), anchors, None, cfg)
  for v in gap.VARIANTS:
    np.testing.assert_allclose(np.asarray(fast[v]), np.asarray(full[v]), rtol=1e-4, atol=1e-5)


def test_build_anchors_maps_variants_and_drops_shared_ids():
  vocab = {"good": 1, " good": 2, "Good": 3, " Good": 4, "bad": 5, " bad": 6, "Bad": 7, " Bad": 8, " ok": 9}
  def encode(text, add_special_tokens=False):
    if text in vocab:
      return [vocab[text]]
    return [9, 10]                       # every unknown form starts with the shared piece " ok"
  tok = types.SimpleNamespace(encode=encode)
  lex = types.SimpleNamespace(name="toy", positive=["good", "wonderful"], negative=["bad", "awful"])
  anchors, report = build_anchors(tok, [lex], first_pieces=True)
  pos = set(np.asarray(anchors.ids[0, 0])[np.asarray(anchors.mask[0, 0])].tolist())
  neg = set(np.asarray(anchors.ids[0, 1])[np.asarray(anchors.mask[0, 1])].tolist())
  assert pos == {1, 2, 3, 4} and neg == {5, 6, 7, 8}       # 9 fell on both sides and was dropped
  assert report["toy"]["positive"]["words_single_token"] == 1
  assert report["toy"]["positive"]["words_multi_token"] == 1
  assert report["toy"]["dropped_shared_ids"] == 1
  empty = types.SimpleNamespace(name="empty", positive=["wonderful"], negative=["awful"])
  with pytest.raises(ValueError, match="no positive anchor token") as err:
    build_anchors(tok, [empty], first_pieces=True)
  assert "\n" not in str(err.value)


def test_build_anchors_drops_first_pieces_by_default_and_reports_them():
  vocab = {"good": 1, " good": 2, "Good": 3, " Good": 4, "bad": 5, " bad": 6, "Bad": 7, " Bad": 8}
  def encode(text, add_special_tokens=False):        # other words split: a first piece, then 20
    if text in vocab:
      return [vocab[text]]
    word = text.strip().lower()
    return [11 if word.startswith("un") else 12 if word.startswith("dis") else 13, 20]
  names = {11: " un", 12: " dis", 13: " ki"}
  tok = types.SimpleNamespace(encode=encode, decode=lambda ids: names[ids[0]])
  lex = types.SimpleNamespace(name="toy", positive=["good", "kind"], negative=["bad", "unkind", "dishonest"])
  anchors, report = build_anchors(tok, [lex])
  neg = set(np.asarray(anchors.ids[0, 1])[np.asarray(anchors.mask[0, 1])].tolist())
  assert neg == {5, 6, 7, 8}                               # ' un' and ' dis' are not anchors
  assert report["toy"]["negative"]["dropped_pieces"] == (" dis", " un")
  assert report["toy"]["positive"]["dropped_pieces"] == (" ki",)
  opt_in, _ = build_anchors(tok, [lex], first_pieces=True)
  assert set(np.asarray(opt_in.ids[0, 1])[np.asarray(opt_in.mask[0, 1])].tolist()) == {5, 6, 7, 8, 11, 12}


def _edit(params, cfg, anchors, **kw):
  return steering.AnchorEdit.create(params, cfg, anchors, anchors.names[0], **kw)


def test_target_mode_reaches_margin_and_is_noop_above_it(tiny):
  cfg, params = tiny
  anchors = make_anchors(cfg.vocab_size)
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(3), cfg.vocab_size, [7, 7])
  _, _, taps = model.forward(params, jnp.asarray(tokens), cfg, attention_mask=jnp.asarray(mask), taps=("final",))
  h = taps["final"]
  probe = _edit(params, cfg, anchors)
  j0 = np.asarray(probe.objective_value(h))
  margin = float(np.median(j0)) + 0.05       # some positions below, some above
  edit = _edit(params, cfg, anchors, mode="target", margin=margin)
  out = edit.edit("final", h, None)
  j1 = np.asarray(edit.objective_value(out))
  below = j0 < margin
  assert below.any() and (~below).any()
  np.testing.assert_allclose(j1[below], margin, atol=1e-4)
  np.testing.assert_array_equal(np.asarray(out)[~below], np.asarray(h)[~below])
  # the edit is minimal along the gradient: a smaller step falls short of the margin
  half = h + 0.5 * (out - h)
  assert (np.asarray(edit.objective_value(half))[below] < margin - 1e-6).all()


def _final_hidden(params, cfg, seed: int = 3):
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(seed), cfg.vocab_size, [7, 7])
  _, _, taps = model.forward(params, jnp.asarray(tokens), cfg, attention_mask=jnp.asarray(mask), taps=("final",))
  return taps["final"]


def test_gated_anchor_edit_edits_only_open_rows(tiny):
  """The anchor edit takes the same per-prompt gate as the other steering methods."""
  cfg, params = tiny
  anchors = make_anchors(cfg.vocab_size)
  h = _final_hidden(params, cfg)
  edit = _edit(params, cfg, anchors, mode="step", alpha=0.5)
  full = np.asarray(edit.edit("final", h, None))
  gated = np.asarray(edit.replace(gate=jnp.asarray([1.0, 0.0])).edit("final", h, None))
  np.testing.assert_allclose(gated[0], full[0], atol=1e-6)
  np.testing.assert_array_equal(gated[1], np.asarray(h)[1])
  assert np.abs(full[1] - np.asarray(h)[1]).max() > 1e-3


def test_step_and_ascent_raise_the_gap(tiny):
  cfg, params = tiny
  anchors = make_anchors(cfg.vocab_size)
  h = jax.random.normal(jax.random.PRNGKey(0), (2, 5, cfg.d_model))
  for kw in (dict(mode="step", alpha=0.1), dict(mode="ascent", alpha=0.5, lam=0.01, steps=3)):
    e = _edit(params, cfg, anchors, **kw)
    assert (np.asarray(e.objective_value(e.edit("final", h, None))) > np.asarray(e.objective_value(h))).all()
  zero = _edit(params, cfg, anchors, mode="step", alpha=0.0)
  np.testing.assert_array_equal(np.asarray(zero.edit("final", h, None)), np.asarray(h))


def test_edit_after_final_norm_is_a_constant_logit_bias(tiny):
  cfg, params = tiny
  anchors = make_anchors(cfg.vocab_size)
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(4), cfg.vocab_size, [6, 6, 6])
  tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
  base, _, _ = model.forward(params, tokens, cfg, attention_mask=mask)
  edit = _edit(params, cfg, anchors, mode="ascent", site="normed", alpha=0.3, lam=0.0, steps=4)
  got, _, _ = model.forward(params, tokens, cfg, attention_mask=mask, intervene=edit)
  delta = np.asarray(got - base).reshape(-1, cfg.vocab_size)
  np.testing.assert_allclose(delta, np.broadcast_to(delta[0], delta.shape), atol=1e-5)
  assert np.abs(delta[0]).max() > 1e-3
  # ... and the same edit before the norm is not constant across positions
  pre = _edit(params, cfg, anchors, mode="ascent", site="final", alpha=0.3, lam=0.0, steps=4)
  got_pre, _, _ = model.forward(params, tokens, cfg, attention_mask=mask, intervene=pre)
  d_pre = np.asarray(got_pre - base).reshape(-1, cfg.vocab_size)
  assert np.abs(d_pre - d_pre[0]).max() > 1e-3


def test_edit_inside_sampler_one_program_for_all_margins(tiny):
  cfg, params = tiny
  anchors = make_anchors(cfg.vocab_size)
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(5), cfg.vocab_size, [6, 3])
  obs = lambda lg, tp, aux: gap.gap_from_logits(lg, aux)["mean"]
  runs = {}
  for m in (-1e3, 5.0):
    e = _edit(params, cfg, anchors, mode="target", margin=m)
    runs[m] = sampler.generate(params, jnp.asarray(tokens), jnp.asarray(mask), cfg, max_new_tokens=5,
                               intervene=e, observe=obs, observe_aux=anchors)
  plain = sampler.generate(params, jnp.asarray(tokens), jnp.asarray(mask), cfg, max_new_tokens=5, observe=obs, observe_aux=anchors)
  np.testing.assert_array_equal(np.asarray(runs[-1e3].tokens), np.asarray(plain.tokens))
  assert (np.asarray(runs[5.0].observed)[..., 0] >= np.asarray(plain.observed)[..., 0] - 1e-5).all()


def test_logit_bias_moves_only_anchor_logits(tiny):
  cfg, params = tiny
  anchors = make_anchors(cfg.vocab_size)
  bias = steering.LogitBias.create(anchors, "lex0", cfg.vocab_size, beta=2.0)
  z = jnp.zeros((1, cfg.vocab_size))
  out = np.asarray(bias.edit("logits", z, None))[0]
  pos = np.asarray(anchors.ids[0, 0])[np.asarray(anchors.mask[0, 0])]
  neg = np.asarray(anchors.ids[0, 1])[np.asarray(anchors.mask[0, 1])]
  assert (out[pos] == 2.0).all() and (out[neg] == -2.0).all()
  assert np.count_nonzero(out) == len(pos) + len(neg)


def test_bad_edit_options_are_clear_errors(tiny):
  cfg, params = tiny
  anchors = make_anchors(cfg.vocab_size)
  with pytest.raises(ValueError, match="edit mode 'nope' is unknown"):
    _edit(params, cfg, anchors, mode="nope")


def test_token_shift_ranks_and_kl():
  a = jnp.asarray([[0.0, 5.0, 1.0, 2.0]])
  b = jnp.asarray([[3.0, 0.0, 1.0, 2.0]])       # aligned top (1) is ranked 4th by base
  s = gap.token_shift(a, b)
  assert int(s["rank_of_top"][0]) == 4
  assert float(s["kl"][0]) > 0
  assert int(gap.token_shift(a, a)["rank_of_top"][0]) == 1
  np.testing.assert_allclose(float(gap.token_shift(a, a)["kl"][0]), 0.0, atol=1e-6)
