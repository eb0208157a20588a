"""Functional model surgery: every named site tapped and edited, patching, attribution patching,
logit lens and direct logit attribution, on tiny random-weight models of three families."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from valuedist.interp import lens, patching
from valuedist.model import sampler, sites, transformer as model
from valuedist.model.edits import Ablate, Add, Patch, Scale, Set, Where
from valuedist.parallel import sharding
from tests import hf_tiny
from tests.test_model import _batch, tiny  # noqa: F401  (the three-family fixture)

fwd = jax.jit(model.forward, static_argnames=("cfg", "taps", "tap_last", "logits"))


def _real(logits, mask):
  return np.asarray(logits)[np.asarray(mask) > 0]


def test_every_site_has_its_documented_shape(tiny):
  cfg, params = tiny
  tokens, mask = _batch(cfg, [6, 4])
  b, t = tokens.shape
  _, _, taps = fwd(params, tokens, cfg, attention_mask=mask, taps=model.TAP_NAMES)
  dims = dict(b=b, t=t, s=t, d=cfg.d_model, f=cfg.d_ff, v=cfg.vocab_size, h=cfg.n_heads, k=cfg.n_kv_heads,
              e=cfg.head_dim)
  for name in model.TAP_NAMES:
    site = sites.site_of(name)
    want = tuple(dims[a] for a in sites.LAYOUT[site])
    if site in sites.BLOCK_SITES:
      want = (cfg.n_layers,) + want
    assert taps[name].shape == want, name


def test_identity_edits_at_every_site_change_nothing(tiny):
  """Adding zero or scaling by one at any site gives bit-identical logits, as does setting every
  site at once to its own tapped value (compared within the same tapped program: live taps
  may let XLA fuse, and round, the RoPE'd q/k differently, ~4e-7). One known exception, named
  here so that any other fails: in Gemma-3 an edit next to a post-norm changes how XLA fuses
  that norm's reduction into the residual add, which rounds differently (<= 6e-7 in the
  logits; the arithmetic is the same)."""
  cfg, params = tiny
  tokens, mask = _batch(cfg, [7, 3])
  base, _, _ = fwd(params, tokens, cfg, attention_mask=mask)
  for s in sites.SITES:
    for iv in (Add(site=s, value=jnp.zeros(())), Scale(site=s, factor=jnp.ones(()))):
      got, _, _ = fwd(params, tokens, cfg, attention_mask=mask, intervene=iv)
      if cfg.post_norms and s in ("resid_pre", "attn.out", "resid_mid", "mlp.out"):
        np.testing.assert_allclose(np.asarray(got), np.asarray(base), rtol=0, atol=1e-6, err_msg=s)
      else:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(base), err_msg=s)
  tapped, _, taps = fwd(params, tokens, cfg, attention_mask=mask, taps=sites.SITES)
  iv = model.Compose(tuple(Set(site=s, value=taps[s], per_layer=s in sites.BLOCK_SITES) for s in sites.SITES))
  got, _, _ = fwd(params, tokens, cfg, attention_mask=mask, taps=sites.SITES, intervene=iv)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(tapped))


def test_zero_ablating_one_head_changes_only_what_comes_after_it(tiny):
  cfg, params = tiny
  tokens, mask = _batch(cfg, [7, 5])
  layer, head = 1, 2
  names = ("resid_pre", "attn.z", "resid_mid", "resid_post")
  _, _, base = fwd(params, tokens, cfg, attention_mask=mask, taps=names)
  iv = Ablate(site="attn.z", where=Where(layers=jax.nn.one_hot(layer, cfg.n_layers), heads=jax.nn.one_hot(head, cfg.n_heads)))
  _, _, got = fwd(params, tokens, cfg, attention_mask=mask, taps=names, intervene=iv)
  m = np.asarray(mask) > 0
  z0, z1 = np.asarray(base["attn.z"]), np.asarray(got["attn.z"])
  np.testing.assert_array_equal(z1[layer][..., head, :][m], 0.0)
  others = [h for h in range(cfg.n_heads) if h != head]
  np.testing.assert_array_equal(z1[:layer + 1][..., others, :], z0[:layer + 1][..., others, :])
  for n in ("resid_pre", "resid_post"):
    np.testing.assert_array_equal(np.asarray(got[n])[:layer], np.asarray(base[n])[:layer])
  np.testing.assert_array_equal(np.asarray(got["resid_pre"])[layer], np.asarray(base["resid_pre"])[layer])
  assert np.abs(np.asarray(got["resid_mid"])[layer] - np.asarray(base["resid_mid"])[layer])[m].max() > 1e-4


def test_per_head_outputs_sum_to_attn_out(tiny):
  cfg, params = tiny
  if cfg.post_norms:
    pytest.skip("with post-norms attn.out is the normed sum of the heads; the sum holds before the norm")
  tokens, mask = _batch(cfg, [6, 4])
  _, _, taps = fwd(params, tokens, cfg, attention_mask=mask, taps=("attn.z", "attn.out"))
  heads = lens.head_outputs(params, cfg, taps["attn.z"]).sum(3)
  bias = params["blocks"]["attn"]["o"].get("bias")
  if bias is not None:
    heads = heads + bias[:, None, None, :]
  np.testing.assert_allclose(np.asarray(heads), np.asarray(taps["attn.out"]), atol=1e-5)


def test_attention_pattern_rows_sum_to_one_and_pads_get_nothing(tiny):
  cfg, params = tiny
  tokens, mask = _batch(cfg, [7, 3])
  _, _, taps = fwd(params, tokens, cfg, attention_mask=mask, taps=("attn.pattern", "attn.scores"))
  p = np.asarray(taps["attn.pattern"])                       # [L, B, H, T, S]
  np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-6)
  pads = np.asarray(mask) == 0                               # [B, S]
  assert pads.any()
  np.testing.assert_array_equal(np.where(pads[None, :, None, None, :], p, 0.0), 0.0)
  causal = np.triu(np.ones((p.shape[3], p.shape[4]), bool), 1)
  future = (~pads)[None, :, None, :, None] & causal          # a real query's later keys
  np.testing.assert_array_equal(np.where(future, p, 0.0), 0.0)
  assert (np.where(future, np.asarray(taps["attn.scores"]), -1e30) <= -1e29).all()


def test_taps_under_left_padding_equal_the_unpadded_run(tiny):
  cfg, params = tiny
  tokens, mask = _batch(cfg, [7, 4])
  _, _, padded = fwd(params, tokens, cfg, attention_mask=mask, taps=sites.SITES)
  alone = tokens[1:, 3:]
  _, _, single = fwd(params, alone, cfg, taps=sites.SITES)
  for s in sites.SITES:
    a, b = np.asarray(padded[s]), np.asarray(single[s])
    lead = 1 if s in sites.BLOCK_SITES else 0
    if sites.LAYOUT[s] == "bhts":                          # [.., B, H, T, S]: the real queries and keys
      a = a[(slice(None),) * lead + (slice(1, 2), slice(None), slice(3, None), slice(3, None))]
    else:
      a = a[(slice(None),) * lead + (slice(1, 2), slice(3, None))]
    np.testing.assert_allclose(a, b, atol=1e-5, err_msg=s)


def test_patching_all_of_resid_pre_reproduces_the_clean_run(tiny):
  cfg, params = tiny
  clean, mask = _batch(cfg, [7, 5], seed=1)
  corrupt = jnp.where(mask > 0, (clean + 7) % cfg.vocab_size, clean)
  ref, _, cache = fwd(params, clean, cfg, attention_mask=mask, taps=("resid_pre",))
  for layer in range(cfg.n_layers):
    iv = Patch(site="resid_pre", source=cache["resid_pre"], where=Where(layers=jax.nn.one_hot(layer, cfg.n_layers)))
    got, _, _ = fwd(params, corrupt, cfg, attention_mask=mask, intervene=iv)
    np.testing.assert_array_equal(_real(got, mask), _real(ref, mask))


def test_patching_one_position_changes_nothing_upstream(tiny):
  cfg, params = tiny
  clean, mask = _batch(cfg, [8, 8], seed=2)
  corrupt = (clean + 5) % cfg.vocab_size
  _, _, cache = fwd(params, clean, cfg, attention_mask=mask, taps=("resid_mid",))
  names = ("resid_pre", "resid_mid", "resid_post")
  _, _, base = fwd(params, corrupt, cfg, attention_mask=mask, taps=names)
  layer, rel = 1, -4                                     # position 4 of 8
  iv = Patch(site="resid_mid", source=cache["resid_mid"],
             where=Where(layers=jax.nn.one_hot(layer, cfg.n_layers), positions=jnp.asarray([rel]), relative=True))
  _, _, got = fwd(params, corrupt, cfg, attention_mask=mask, taps=names, intervene=iv)
  for n in names:
    a, b = np.asarray(base[n]), np.asarray(got[n])
    np.testing.assert_array_equal(a[:layer], b[:layer])       # earlier layers
    np.testing.assert_array_equal(a[:, :, :8 + rel], b[:, :, :8 + rel])   # earlier positions
  np.testing.assert_array_equal(np.asarray(got["resid_mid"])[layer, :, 8 + rel], np.asarray(cache["resid_mid"])[layer, :, 8 + rel])
  assert np.abs(np.asarray(got["resid_post"])[-1, :, -1] - np.asarray(base["resid_post"])[-1, :, -1]).max() > 1e-4


def test_patch_aligns_by_prompt_end_across_padding(tiny):
  """A source run with other left padding patches the same tokens: positions are relative to
  each prompt's end, so patching a run into a re-padded copy of itself changes nothing, and
  equals patching into the unpadded run."""
  cfg, params = tiny
  tokens, mask = _batch(cfg, [7, 4], seed=3)
  _, _, cache = fwd(params, tokens, cfg, attention_mask=mask, taps=("resid_post",))
  alone = tokens[1:, 3:]
  other = (alone + 11) % cfg.vocab_size
  ref, _, _ = fwd(params, alone, cfg)
  src = cache["resid_post"][:, 1:]                       # [L, 1, 7, D] of which 4 real slots at the end
  iv = Patch(site="resid_post", source=src, where=Where(layers=jax.nn.one_hot(0, cfg.n_layers)))
  got, _, _ = fwd(params, other, cfg, intervene=iv)
  np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=1e-5)


def test_an_edit_at_decode_step_k_changes_steps_from_k_only(tiny):
  cfg, params = tiny
  tokens, mask = _batch(cfg, [6, 4], seed=4)
  k = 3
  observe = lambda logits, taps, aux: logits
  base = sampler.generate(params, tokens, mask, cfg, max_new_tokens=6, observe=observe)
  push = jax.random.normal(jax.random.PRNGKey(1), (cfg.d_model,)) * 5.0
  iv = Add(site="resid_post", value=push, where=Where(steps=jnp.asarray([k])))
  got = sampler.generate(params, tokens, mask, cfg, max_new_tokens=6, observe=observe, intervene=iv)
  o0, o1 = np.asarray(base.observed), np.asarray(got.observed)           # [N, B, V]: o[i] picks token i
  np.testing.assert_array_equal(o0[:k], o1[:k])
  np.testing.assert_array_equal(np.asarray(base.tokens)[:, :k], np.asarray(got.tokens)[:, :k])
  assert np.abs(o0[k] - o1[k]).max() > 1e-3
  # relative positions: the first generated token is position 0 after the prompt, at step 1
  first = Add(site="resid_post", value=push, where=Where(positions=jnp.asarray([0]), relative=True))
  got = sampler.generate(params, tokens, mask, cfg, max_new_tokens=6, observe=observe, intervene=first)
  o1 = np.asarray(got.observed)
  np.testing.assert_array_equal(o0[:1], o1[:1])
  assert np.abs(o0[1] - o1[1]).max() > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_attribution_patching_matches_the_finite_difference_at_every_site(family):
  """d metric along (clean - corrupted) at each site, from one backward pass, equals the change
  of the metric for a small step eps along that difference, divided by eps."""
  _, cfg, params = hf_tiny.build(family)
  params = jax.tree.map(jnp.asarray, params)
  clean, mask = _batch(cfg, [7, 5], seed=5)
  corrupt = jnp.where(jnp.arange(7) == 3, (clean + 9) % cfg.vocab_size, clean)
  metric = patching.logit_difference(jnp.asarray([3, 4]), jnp.asarray([5, 6]))
  attr, _ = patching.attribution_patching(params, cfg, metric, (clean, mask), (corrupt, mask), sites.SITES)
  _, _, c_clean = fwd(params, clean, cfg, attention_mask=mask, taps=sites.SITES)
  _, _, c_bad = fwd(params, corrupt, cfg, attention_mask=mask, taps=sites.SITES)
  base = metric(fwd(params, corrupt, cfg, attention_mask=mask)[0])
  eps = 1e-3
  for s in sites.SITES:
    diff = c_clean[s].astype(jnp.float32) - c_bad[s].astype(jnp.float32)
    if s == "attn.scores":                  # masked entries: NEG_INF - NEG_INF; keep the step finite
      diff = jnp.where(c_bad[s] < -1e29, 0.0, diff)
    step = Add(site=s, value=eps * diff, per_layer=s in sites.BLOCK_SITES)
    moved = metric(fwd(params, corrupt, cfg, attention_mask=mask, intervene=step)[0])
    fd = np.asarray((moved - base) / eps)                             # [B]
    b_axis = 1 if s in sites.BLOCK_SITES else 0
    est = np.moveaxis(np.asarray(attr[s]), b_axis, 0).reshape(clean.shape[0], -1).sum(-1)   # [B]
    np.testing.assert_allclose(est, fd, rtol=2e-2, atol=2e-3, err_msg=s)
    if s in ("resid_pre", "attn.z", "mlp.post"):
      assert np.abs(fd).max() > 1e-3, s                               # the check is not vacuous


def test_activation_patching_grid_matches_single_patches():
  _, cfg, params = hf_tiny.build("llama")
  params = jax.tree.map(jnp.asarray, params)
  clean, mask = _batch(cfg, [6, 6], seed=6)
  corrupt = jnp.where(jnp.arange(6) == 2, (clean + 9) % cfg.vocab_size, clean)
  metric = patching.logit_difference(jnp.asarray([3, 4]), jnp.asarray([5, 6]))
  grid = patching.activation_patching(params, cfg, metric, (clean, mask), (corrupt, mask), "attn.z",
                                      by=("layer", "position", "head"), chunk=5)
  assert grid.shape == (cfg.n_layers, 6, cfg.n_heads, 2)
  _, _, cache = fwd(params, clean, cfg, attention_mask=mask, taps=("attn.z",))
  for l, p, h in [(0, 2, 1), (2, 5, 3), (1, 0, 0)]:
    iv = Patch(site="attn.z", source=cache["attn.z"], where=Where(
        layers=jax.nn.one_hot(l, cfg.n_layers), positions=jnp.asarray([p - 6]), relative=True,
        heads=jax.nn.one_hot(h, cfg.n_heads)))
    want = metric(fwd(params, corrupt, cfg, attention_mask=mask, intervene=iv)[0])
    np.testing.assert_allclose(np.asarray(grid[l, p, h]), np.asarray(want), atol=1e-5)
  # positions before the corrupted token carry nothing: patching them leaves the corrupted metric
  bad = metric(fwd(params, corrupt, cfg, attention_mask=mask)[0])
  np.testing.assert_allclose(np.asarray(grid[:, :2]), np.broadcast_to(np.asarray(bad), grid[:, :2].shape), atol=1e-5)
  with pytest.raises(ValueError, match="does not fit site"):
    patching.activation_patching(params, cfg, metric, (clean, mask), (corrupt, mask), "resid_post", by=("layer", "head"))


def test_logit_lens_and_direct_logit_attribution(tiny):
  cfg, params = tiny
  tokens, mask = _batch(cfg, [6, 6], seed=7)
  logits, _, taps = fwd(params, tokens, cfg, attention_mask=mask, taps=("resid_post", "final", "embed", "attn.out", "mlp.out"))
  np.testing.assert_allclose(np.asarray(lens.logit_lens(params, cfg, taps["resid_post"][-1])), np.asarray(logits), atol=1e-4)
  if cfg.final_softcap is not None:
    return
  good, bad = jnp.asarray([3, 4]), jnp.asarray([5, 6])
  direction = lens.logit_direction(params, cfg, good, bad)
  parts = jnp.concatenate([taps["embed"][None, :, -1], taps["attn.out"][:, :, -1], taps["mlp.out"][:, :, -1]])
  dla = lens.direct_logit_attribution(params, cfg, parts, taps["final"][:, -1], direction)
  total = dla.sum(0)
  if "bias" in params["final_norm"]:                     # LayerNorm's bias adds a constant
    total = total + jnp.einsum("d,bd->b", params["final_norm"]["bias"], direction)
  diff = logits[:, -1][jnp.arange(2), good] - logits[:, -1][jnp.arange(2), bad]
  np.testing.assert_allclose(np.asarray(total), np.asarray(diff), rtol=1e-4, atol=1e-4)


def test_selection_errors_name_the_problem(tiny):
  cfg, params = tiny
  tokens, mask = _batch(cfg, [4])
  with pytest.raises(ValueError, match="no head axis"):
    model.forward(params, tokens, cfg, intervene=Ablate(site="resid_post", where=Where(heads=jnp.ones(cfg.n_heads))))
  with pytest.raises(ValueError, match="unknown sites"):
    Add(site="attn.nope", value=jnp.zeros(()))


def test_patching_runs_equal_on_eight_devices():
  _, cfg, params = hf_tiny.build("llama")
  clean, mask = _batch(cfg, [6, 6, 5, 6, 4, 6, 6, 3], seed=8)
  corrupt = jnp.where(jnp.arange(6) == 3, (clean + 9) % cfg.vocab_size, clean)
  good, bad = jnp.arange(8) + 3, jnp.arange(8) + 20
  metric = patching.logit_difference(good, bad)
  one = jax.tree.map(jnp.asarray, params)
  grid1 = patching.activation_patching(one, cfg, metric, (clean, mask), (corrupt, mask), "resid_pre")
  attr1, _ = patching.attribution_patching(one, cfg, metric, (clean, mask), (corrupt, mask), ("resid_pre", "attn.z"))
  mesh = sharding.make_mesh(4, 2)
  p8 = sharding.shard_params(jax.tree.map(np.asarray, params), mesh, cfg)
  c8, m8, k8 = sharding.shard_batch((np.asarray(clean), np.asarray(mask), np.asarray(corrupt)), mesh)
  metric8 = patching.logit_difference(good, bad)
  grid8 = patching.activation_patching(p8, cfg, metric8, (c8, m8), (k8, m8), "resid_pre")
  attr8, _ = patching.attribution_patching(p8, cfg, metric8, (c8, m8), (k8, m8), ("resid_pre", "attn.z"))
  np.testing.assert_allclose(np.asarray(grid8), np.asarray(grid1), atol=1e-5)
  for s in attr1:
    np.testing.assert_allclose(np.asarray(attr8[s]), np.asarray(attr1[s]), atol=1e-5)


def test_mean_ablating_neurons_sets_only_them_to_their_mean(tiny):
  cfg, params = tiny
  tokens, mask = _batch(cfg, [7, 4], seed=9)
  _, cache = patching.run_with_cache(params, tokens, cfg, ("mlp.post",), attention_mask=mask)
  mean = patching.site_mean(cache, "mlp.post", mask)                     # [L, F]
  m = np.asarray(mask) > 0
  np.testing.assert_allclose(np.asarray(mean), np.asarray(cache["mlp.post"])[:, m].mean(1), rtol=1e-5, atol=1e-6)
  neurons = jnp.zeros(cfg.d_ff).at[jnp.asarray([3, 17])].set(1.0)
  iv = Ablate(site="mlp.post", mean=mean, per_layer=True, where=Where(features=neurons, layers=jnp.eye(cfg.n_layers)[2]))
  _, _, got = fwd(params, tokens, cfg, attention_mask=mask, taps=("mlp.post",), intervene=iv)
  g, c = np.asarray(got["mlp.post"]), np.asarray(cache["mlp.post"])
  np.testing.assert_array_equal(g[:2], c[:2])
  np.testing.assert_array_equal(g[2][m][:, [3, 17]], np.broadcast_to(np.asarray(mean)[2, [3, 17]], (m.sum(), 2)))
  others = np.setdiff1d(np.arange(cfg.d_ff), [3, 17])
  np.testing.assert_array_equal(g[2][..., others], c[2][..., others])
  np.testing.assert_array_equal(g[2][~m], c[2][~m])                      # pads are never edited


def test_a_span_selects_its_half_open_range_per_row_and_splits_with_the_rows():
  pos = jnp.asarray([[0, 1, 2, 3, 4], [0, 0, 1, 2, 3]])                   # row 1 is left-padded
  mask = jnp.asarray([[1, 1, 1, 1, 1], [0, 1, 1, 1, 1]])
  ctx = sites.Context.create(pos, mask, prompt_len=jnp.asarray([3, 3]))    # relative: [-3..1], [., -3..0]
  prompt = Where(span=jnp.asarray([-2**30, 0]), relative=True).tokens(ctx)
  np.testing.assert_array_equal(np.asarray(prompt), [[1, 1, 1, 0, 0], [0, 1, 1, 1, 0]])
  per_row = Where(span=jnp.asarray([[1, 3], [-1, 1]]), relative=False).tokens(ctx)    # absolute positions
  np.testing.assert_array_equal(np.asarray(per_row), [[0, 1, 1, 0, 0], [0, 1, 0, 0, 0]])
  rel = Where(span=jnp.asarray([[1, 3], [-1, 1]]), relative=True).tokens(ctx)
  np.testing.assert_array_equal(np.asarray(rel), [[0, 0, 0, 0, 1], [0, 0, 0, 1, 1]])
  # a Where nested in an intervention splits its per-row fields with the batch rows, keeps shared ones whole
  iv = model.AddToResidual(jnp.zeros((2, 3, 4)), where=Where(span=jnp.asarray([[1, 3], [-1, 1]]),
                                                                  layers=jnp.ones(3)))
  specs = iv.row_specs()
  assert specs.where.span == jax.sharding.PartitionSpec(sharding.DATA)
  assert specs.where.layers == jax.sharding.PartitionSpec()
  assert specs.vectors == jax.sharding.PartitionSpec(sharding.DATA)
  both = sites.concat_rows([sites.per_row(iv, 2), sites.per_row(iv.replace(vectors=jnp.zeros((3, 4))), 2)], 4)
  assert both.where.span.shape == (4, 2) and both.where.layers.shape == (4, 3)
