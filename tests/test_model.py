"""Model-core properties: padding invariance, taps, interventions, multi-device equality, errors."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from valuedist.model import families, params as params_lib, sampler, transformer as model
from valuedist.model.config import ModelConfig
from valuedist.parallel import sharding
from tests import hf_tiny


@pytest.fixture(scope="module", params=["llama", "gemma3", "gpt2"])
def tiny(request):
  _, cfg, params = hf_tiny.build(request.param)
  return cfg, jax.tree.map(jnp.asarray, params)


def _batch(cfg, lengths, seed=0):
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(seed), cfg.vocab_size, lengths)
  return jnp.asarray(tokens), jnp.asarray(mask)


def test_batched_with_padding_equals_one_at_a_time(tiny):
  cfg, params = tiny
  lengths = [11, 4, 7]
  tokens, mask = _batch(cfg, lengths)
  logits, _, _ = model.forward(params, tokens, cfg, attention_mask=mask)
  gen = sampler.generate(params, tokens, mask, cfg, max_new_tokens=10)
  for i, n in enumerate(lengths):
    row = tokens[i:i + 1, -n:]
    alone, _, _ = model.forward(params, row, cfg)
    np.testing.assert_allclose(np.asarray(logits[i, -n:]), np.asarray(alone[0]), atol=1e-5)
    gen1 = sampler.generate(params, row, jnp.ones_like(row), cfg, max_new_tokens=10)
    np.testing.assert_array_equal(np.asarray(gen.tokens[i]), np.asarray(gen1.tokens[0]))


def test_taps_shapes_and_only_requested(tiny):
  cfg, params = tiny
  tokens, mask = _batch(cfg, [5, 3])
  _, _, taps = model.forward(params, tokens, cfg, attention_mask=mask, taps=("resid_post", "final_normed"))
  assert set(taps) == {"resid_post", "final_normed"}
  assert taps["resid_post"].shape == (cfg.n_layers, 2, 5, cfg.d_model)
  assert taps["final_normed"].shape == (2, 5, cfg.d_model)
  logits, _, all_taps = model.forward(params, tokens, cfg, attention_mask=mask, taps=model.TAP_NAMES)
  # the last block's residual is the final hidden state, and logits come from the normed one
  np.testing.assert_array_equal(all_taps["resid_post"][-1], all_taps["final"])
  np.testing.assert_allclose(model.logits_from_normed(params, all_taps["final_normed"], cfg), logits, atol=1e-5)
  with pytest.raises(ValueError, match="unknown taps"):
    model.forward(params, tokens, cfg, taps=("nope",))


def test_zero_intervention_changes_nothing(tiny):
  cfg, params = tiny
  tokens, mask = _batch(cfg, [6, 2])
  base, _, _ = model.forward(params, tokens, cfg, attention_mask=mask)
  zero = model.AddToResidual(jnp.zeros((cfg.n_layers, cfg.d_model)))
  got, _, _ = model.forward(params, tokens, cfg, attention_mask=mask, intervene=zero)
  np.testing.assert_array_equal(np.asarray(base), np.asarray(got))


def test_vector_at_layer_changes_only_later_layers(tiny):
  cfg, params = tiny
  tokens, mask = _batch(cfg, [6, 4])
  layer = 1
  vectors = jnp.zeros((cfg.n_layers, cfg.d_model)).at[layer].set(jax.random.normal(jax.random.PRNGKey(0), (cfg.d_model,)))
  fwd = jax.jit(model.forward, static_argnames=("cfg", "taps", "logits"))
  _, _, base = fwd(params, tokens, cfg, attention_mask=mask, taps=("resid_post",))
  compiled_before = fwd._cache_size()
  for scale in (0.0, 2.0):   # traced coefficient: one compiled program for both
    _, _, got = fwd(params, tokens, cfg, attention_mask=mask, taps=("resid_post",),
                    intervene=model.AddToResidual(vectors, jnp.asarray(scale)))
    r0, r1 = np.asarray(base["resid_post"]), np.asarray(got["resid_post"])
    np.testing.assert_array_equal(r0[:layer], r1[:layer])
    if scale:
      np.testing.assert_allclose(r1[layer] - r0[layer], np.broadcast_to(2.0 * vectors[layer], r0[layer].shape), atol=1e-5)
      assert np.abs(r1[layer + 1:] - r0[layer + 1:]).max() > 1e-3
    else:
      np.testing.assert_array_equal(r0, r1)
  assert fwd._cache_size() == compiled_before + 1   # both strengths share one compiled program


def test_intervention_applies_during_decode(tiny):
  cfg, params = tiny
  tokens, mask = _batch(cfg, [5, 5])
  # a random direction: a constant shift would vanish under GPT-2's mean-centring LayerNorm
  vec = jnp.zeros((cfg.n_layers, cfg.d_model)).at[0].set(3.0 * jax.random.normal(jax.random.PRNGKey(1), (cfg.d_model,)))
  base = sampler.generate(params, tokens, mask, cfg, max_new_tokens=6, observe=lambda lg, tp, aux: lg)
  zero = sampler.generate(params, tokens, mask, cfg, max_new_tokens=6, observe=lambda lg, tp, aux: lg,
                          intervene=model.AddToResidual(vec, jnp.asarray(0.0)))
  pushed = sampler.generate(params, tokens, mask, cfg, max_new_tokens=6, observe=lambda lg, tp, aux: lg,
                            intervene=model.AddToResidual(vec, jnp.asarray(1.0)))
  # a different compiled program may fuse differently: equal up to f32 reassociation
  np.testing.assert_allclose(np.asarray(base.observed), np.asarray(zero.observed), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(base.tokens), np.asarray(zero.tokens))
  assert np.abs(np.asarray(base.observed) - np.asarray(pushed.observed)).max() > 1e-3


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
def test_prefill_into_fresh_cache_skips_its_empty_slots(tiny, layout):
  """A fresh `init_cache` (index the Python int 0) is known empty: a prefill into it attends to
  its new keys alone (the scores tap has T keys, not S + T) and never reads the buffers; the
  logits and the written cache equal a prefill into the same cache whose index is traced."""
  cfg, params = tiny
  if layout == "unstacked":
    params = params_lib.unstack_blocks(params)
  tokens, mask = _batch(cfg, [7, 3])
  t, s = tokens.shape[1], tokens.shape[1] + 5

  def prefill(p, traced_index):
    cache = model.init_cache(cfg, 2, s, per_layer=layout == "unstacked")
    assert model.known_empty(cache)
    if traced_index:
      cache = cache._replace(index=jnp.int32(0) + 0 * jnp.sum(mask))    # empty, but not known to be
      assert not model.known_empty(cache)
    return model.forward(p, tokens, cfg, attention_mask=mask, cache=cache, taps=("attn.scores",))

  fresh, traced = jax.jit(prefill, static_argnums=1)(params, False), jax.jit(prefill, static_argnums=1)(params, True)
  assert fresh[2]["attn.scores"].shape[-1] == t and traced[2]["attn.scores"].shape[-1] == s + t
  real = np.asarray(mask, bool)
  np.testing.assert_allclose(np.asarray(fresh[0])[real], np.asarray(traced[0])[real], atol=1e-6)
  for a, b in zip(jax.tree.leaves((fresh[1].k, fresh[1].v, fresh[1].key_pos)),
                  jax.tree.leaves((traced[1].k, traced[1].v, traced[1].key_pos))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)
  assert int(fresh[1].index) == int(traced[1].index) == t
  assert fresh[1].index.dtype == traced[1].index.dtype == jnp.int32


@pytest.mark.parametrize("data,model_axis", [(8, 1), (4, 2)])
def test_eight_devices_equal_one(tiny, data, model_axis):
  cfg, params = tiny
  assert jax.device_count() == 8, "conftest forces 8 host devices"
  tokens, mask = _batch(cfg, [9, 3, 6, 2, 8, 1, 5, 7], seed=4)
  one_logits, _, _ = model.forward(params, tokens, cfg, attention_mask=mask)
  one_gen = sampler.generate(params, tokens, mask, cfg, max_new_tokens=8)
  mesh = sharding.make_mesh(data, model_axis)
  p8 = sharding.shard_params(params, mesh)
  t8, m8 = sharding.shard_batch((tokens, mask), mesh)
  logits8, _, _ = jax.jit(model.forward, static_argnames="cfg")(p8, t8, cfg, attention_mask=m8)
  gen8 = sampler.generate(p8, t8, m8, cfg, max_new_tokens=8)
  assert len(logits8.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(logits8), np.asarray(one_logits), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(gen8.tokens), np.asarray(one_gen.tokens))


def test_sampling_knobs():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
  key = jax.random.PRNGKey(0)
  keys = jax.random.split(key, 200)
  # 200 draws as one jitted program (drawn one eager call at a time they took minutes)
  draws = lambda **kw: set(np.asarray(jax.jit(jax.vmap(lambda k: sampler.choose(logits, k, True, **kw)[0]))(keys)).tolist())
  assert draws(temperature=1.0, top_k=2, top_p=1.0) == {0, 1}
  assert draws(temperature=1.0, top_k=0, top_p=0.7) == {0, 1}     # 0.5 < 0.7, 0.8 >= 0.7
  assert draws(temperature=1.0, top_k=0, top_p=0.4) == {0}
  assert len(draws(temperature=1.0, top_k=0, top_p=1.0)) == 4
  assert int(sampler.choose(logits, key, False, 1.0, 0, 1.0)[0]) == 0


def test_sampling_filters_keep_what_a_sort_keeps():
  """The top-k and top-p cuts (bisection over the logits' values, `sampler.kept`) keep exactly
  the tokens a sort keeps: the k largest (ties at the k-th kept together) and the tokens whose
  strictly larger logits hold less than top_p of the mass, on rows with ties, a padded column
  and -inf."""
  rng = np.random.RandomState(0)
  logits = (3 * rng.standard_normal((64, 50))).astype(np.float32)
  logits[:8, 10:20] = logits[:8, 10:11]                    # ties
  logits[8:12, -1] = np.finfo(np.float32).min               # a padded column
  logits[12:16, 3] = -np.inf
  def keep_by_sort(z, k, p):
    z = z.astype(np.float64)
    kth = np.sort(z)[::-1][min(k, len(z)) - 1] if k > 0 else -np.inf
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    above = np.array([probs[z > x].sum() for x in z])
    return (z >= kth) & ((above < p) | (p >= 1))
  for k, p in ((5, 1.0), (0, 0.5), (12, 0.9), (1, 0.3), (0, 1.0), (50, 0.99), (13, 0.999)):
    got = np.asarray(jax.jit(sampler.kept)(jnp.asarray(logits), k, p))
    want = np.stack([keep_by_sort(z, k, p) for z in logits])
    np.testing.assert_array_equal(got, want, err_msg=f"top_k={k} top_p={p}")
    assert 1 <= got.sum(-1).min() and (k == 0 or (got.sum(-1) >= min(k, 50)).all() or p < 1)


def test_eos_stops_rows_and_pads():
  _, cfg, params = hf_tiny.build("llama")
  tokens, mask = _batch(cfg, [4, 6])
  free = sampler.generate(params, tokens, mask, cfg, max_new_tokens=12)
  eos = int(free.tokens[0, 3])          # make row 0's fourth token the EOS
  gen = sampler.generate(params, tokens, mask, cfg, max_new_tokens=12, eos_ids=jnp.asarray([eos]), pad_id=-1)
  row = np.asarray(gen.tokens[0])
  stop = int(np.argmax(row == eos))
  assert int(gen.lengths[0]) == stop + 1 and (row[stop + 1:] == -1).all()
  np.testing.assert_array_equal(row[:stop + 1], np.asarray(free.tokens[0, :stop + 1]))


def test_unsupported_architecture_and_options_are_clear_errors():
  with pytest.raises(families.UnsupportedModel, match="supported: "):
    families.config_from_hf(transformers.BertConfig())
  with pytest.raises(families.UnsupportedModel, match="rope_type 'yarn'"):
    families.config_from_hf(transformers.LlamaConfig(
        rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0, original_max_position_embeddings=64)))
  with pytest.raises(families.UnsupportedModel, match="reorder_and_upcast_attn"):
    families.config_from_hf(transformers.GPT2Config(reorder_and_upcast_attn=True))


@pytest.mark.parametrize("compute", ["float32", "bfloat16"])
def test_bf16_params(compute):
  """bf16 params run in f32 (full precision) or bf16 compute; norms, softmax and logits stay f32."""
  _, cfg, params = hf_tiny.build("gemma2")
  tokens, mask = _batch(cfg, [8, 5])
  ref, _, _ = model.forward(params, tokens, cfg, attention_mask=mask)
  p16 = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
  c16 = cfg.replace(compute_dtype=compute)
  got, _, taps = model.forward(p16, tokens, c16, attention_mask=mask, taps=("resid_post",))
  assert got.dtype == jnp.float32 and taps["resid_post"].dtype == jnp.dtype(compute)
  m = np.asarray(mask, bool)
  err = np.abs(np.asarray(got) - np.asarray(ref))[m].max()
  assert err < (0.03 if compute == "float32" else 0.06), err   # measured 0.010 and 0.021
  gen = sampler.generate(p16, tokens, mask, c16, max_new_tokens=4)
  assert gen.tokens.shape == (2, 4)


@pytest.mark.parametrize("window", [None, 40])
def test_attention_in_query_blocks_equals_one_block(window):
  """layers.attend with query blocks (a cache part, then the new tokens, left padded) gives
  every real query the output of the unblocked computation, and skips the keys it may."""
  from valuedist.model import layers
  rng = np.random.RandomState(0)
  b, t, s, h, kv, dh = 3, 150, 20, 4, 2, 8
  cfg = ModelConfig(family="llama", vocab_size=16, d_model=h * dh, n_layers=1, n_heads=h, n_kv_heads=kv, head_dim=dh,
                    d_ff=8, max_positions=512)
  q = jnp.asarray(rng.normal(size=(b, t, h, dh)), jnp.float32)
  kc, vc, kn, vn = (jnp.asarray(rng.normal(size=(b, kv, n, dh)), jnp.float32) for n in (s, s, t, t))
  kc, kn = jnp.swapaxes(kc, 2, 3), jnp.swapaxes(kn, 2, 3)              # keys [B, K, Dh, S]
  lengths = np.array([t, 97, 5])
  mask = (np.arange(t)[None] >= t - lengths[:, None]).astype(np.int32)
  pos = jnp.asarray(np.maximum(np.cumsum(mask, -1) - 1, 0) + s)          # after s cached positions
  new_pos = jnp.where(jnp.asarray(mask) > 0, pos, -1)
  cache_pos = jnp.asarray(np.tile(np.arange(s), (b, 1)))
  win = None if window is None else jnp.asarray(window)
  parts = [(kc, vc, layers.attention_bias(pos, cache_pos, win)), (kn, vn, layers.attention_bias(pos, new_pos, win))]
  whole = layers.attend(q, parts, cfg)
  blocked = jax.jit(lambda q, parts: layers.attend(q, parts, cfg, query_block=64))(q, parts)
  real = mask.astype(bool)
  np.testing.assert_allclose(np.asarray(blocked)[real], np.asarray(whole)[real], atol=1e-6)
  hlo = jax.jit(lambda q, parts: layers.attend(q, parts, cfg, query_block=64)).lower(q, parts).as_text()
  assert "64x20" in hlo and "64x64" in hlo and "64x128" in hlo and "22x150" in hlo   # key widths per block
  long_q = jnp.concatenate([q, q], 1)                                   # T = 300: at most 4 blocks, of 75
  long_pos = jnp.asarray(np.tile(np.arange(2 * t), (b, 1)))
  long_kv = (jnp.concatenate([kn, kn], 3), jnp.concatenate([vn, vn], 2), layers.attention_bias(long_pos, long_pos, win))
  whole = layers.attend(long_q, [long_kv], cfg)
  blocked = jax.jit(lambda q, parts: layers.attend(q, parts, cfg, query_block=64))
  np.testing.assert_allclose(np.asarray(blocked(long_q, [long_kv])), np.asarray(whole), atol=1e-6)
  hlo = blocked.lower(long_q, [long_kv]).as_text()
  assert all(f"75x{w}" in hlo for w in (75, 150, 225, 300)) and "64x64" not in hlo


def test_decode_attention_moves_no_scores():
  """A decode step's attention (a cache part and one new key) compiles to batched matmuls
  that read the stacked queries as they are: no transpose or copy of a scores-sized array
  (the einsum form transposed and copied the [B, K, G, 1, S] scores and probabilities)."""
  from valuedist.model import layers
  b, s, h, kv, dh = 4, 97, 6, 2, 16
  cfg = ModelConfig(family="llama", vocab_size=16, d_model=h * dh, n_layers=1, n_heads=h, n_kv_heads=kv, head_dim=dh,
                    d_ff=8, max_positions=512)
  rng = np.random.RandomState(0)
  q = jnp.asarray(rng.normal(size=(b, 1, h, dh)), jnp.float32)
  kc, vc, kn, vn = (jnp.asarray(rng.normal(size=(b, kv, n, dh)), jnp.float32) for n in (s, s, 1, 1))
  kc, kn = jnp.swapaxes(kc, 2, 3), jnp.swapaxes(kn, 2, 3)              # keys [B, K, Dh, S]
  qpos = jnp.full((b, 1), s)
  parts = [(kc, vc, layers.attention_bias(qpos, jnp.tile(jnp.arange(s), (b, 1)), None)),
           (kn, vn, layers.attention_bias(qpos, qpos, None))]
  hlo = jax.jit(lambda q, parts: layers.attend(q, parts, cfg)).lower(q, parts).compile().as_text()
  moved = [line for line in hlo.splitlines() if re.search(r"= f32\[[^\]]*\b(97|98)\b[^\]]*\]\S* (transpose|copy)\(", line)]
  assert not moved, moved
