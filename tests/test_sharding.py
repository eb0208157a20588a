"""Model-parallel placement: head-aware partition specs (compiled-HLO collectives) and an
8B-class checkpoint that fits a v5e chip only when split across the model axis."""
import collections
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from valuedist.model import families, params as P, sampler, transformer as model
from valuedist.parallel import sharding
from tests import hf_tiny

V5E_HBM = 16 * 2**30


def _collectives(compiled_text: str) -> dict:
  ops = re.findall(r"= \S+ (all-reduce|all-gather|collective-permute|all-to-all|reduce-scatter)\(", compiled_text)
  return dict(collections.Counter(ops))


@pytest.mark.parametrize("model_axis", [2, 4])
def test_model_parallel_forward_has_only_the_megatron_all_reduces(model_axis):
  """Tiny Llama with 4 query and 2 KV heads: at model = 2 every attention kernel splits by
  heads; at model = 4 the KV heads do not divide, so k/v stay whole (replicated). Either way
  the compiled forward's only collectives are three all-reduces (embedding lookup, attention
  output o, MLP down: the layer scan's body holds the per-layer pair), where splitting k/v
  inside a head (the specs without the config) adds all-gathers and collective-permutes."""
  _, cfg, params = hf_tiny.build("llama")
  assert (cfg.n_heads, cfg.n_kv_heads) == (4, 2)
  mesh = sharding.make_mesh(8 // model_axis, model_axis)
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(0), cfg.vocab_size - 3, [5, 6, 7, 8, 5, 6, 7, 8])
  t, m = sharding.shard_batch((tokens, mask), mesh)
  host = jax.tree.map(np.asarray, params)
  fwd = jax.jit(model.forward, static_argnames="cfg")

  def compiled(cfg_for_specs):
    p = sharding.shard_params(host, mesh, cfg_for_specs)
    return p, fwd.lower(p, t, cfg, attention_mask=m).compile()

  p, c = compiled(cfg)
  assert _collectives(c.as_text()) == {"all-reduce": 3}
  kv = p["blocks"]["attn"]["k"]["kernel"]
  split = model_axis if cfg.n_kv_heads % model_axis == 0 else 1
  assert {s.data.shape for s in kv.addressable_shards} == {(cfg.n_layers, cfg.d_model, cfg.n_kv_heads * cfg.head_dim // split)}
  ref, _, _ = model.forward(params, jnp.asarray(tokens), cfg, attention_mask=jnp.asarray(mask))
  np.testing.assert_allclose(np.asarray(c(p, t, attention_mask=m)[0]), np.asarray(ref), atol=1e-5)
  if model_axis == 4:
    assert set(_collectives(compiled(None)[1].as_text())) > {"all-reduce"}     # the head-cutting specs


def test_llama3_8b_generate_fits_a_v5e_chip_only_model_parallel():
  """Llama-3-8B shapes in bf16, `generate` compiled (never run) on 8 devices: split 8 ways on
  the model axis every device's arguments (its weight shards and batch rows) and temporaries
  fit a v5e chip's 16 GiB; replicated on a data-only mesh the weights alone are ~15 GiB."""
  hf = transformers.LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                rope_theta=500000.0, tie_word_embeddings=False)
  cfg = dataclasses.replace(families.config_from_hf(hf), compute_dtype="bfloat16")
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, jnp.bfloat16), P.param_shapes(cfg), is_leaf=P._is_shape)
  assert 8.0e9 < sum(np.prod(a.shape) for a in jax.tree.leaves(abstract)) < 8.1e9

  def memory(data, model_axis):
    mesh = sharding.make_mesh(data, model_axis)
    sh = sharding.param_shardings(abstract, mesh, cfg)
    p = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, sh)
    tok = jax.ShapeDtypeStruct((8, 128), jnp.int32, sharding=sharding.batch_sharding(mesh, 2))
    gen = jax.jit(lambda p, t, m: sampler.generate(p, t, m, cfg, max_new_tokens=16).tokens)
    return gen.lower(p, tok, tok).compile().memory_analysis()

  split = memory(1, 8)
  assert split.argument_size_in_bytes + split.temp_size_in_bytes < V5E_HBM
  assert split.argument_size_in_bytes < 2.1 * 2**30
  assert memory(8, 1).argument_size_in_bytes > 14.5 * 2**30


@pytest.mark.parametrize("model_axis", [2, 4])
def test_kv_cache_and_activations_have_the_per_device_shapes_of_the_specs(model_axis):
  """Under the study mesh (`jax.set_mesh`) the KV cache (keys [L, B, K, Dh, S], values
  [L, B, K, S, Dh]) is split on rows
  (data) and on KV heads (model) when the model axis divides them (K = 2 at model = 2), whole
  heads otherwise (model = 4), in the compute dtype: the prefill's returned cache has those
  shards, the compiled `generate` carries exactly that per-device cache (the whole cache
  appears nowhere; XLA's CPU backend upcasts bf16
  dots, so the dtype is checked on the returned cache), and the residual stream is [B / data, T, D] per device."""
  _, cfg, params = hf_tiny.build("llama")
  cfg = dataclasses.replace(cfg, compute_dtype="bfloat16")
  mesh = sharding.make_mesh(8 // model_axis, model_axis)
  b, t, n = 8, 8, 4
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(0), cfg.vocab_size - 3, [5, 6, 7, 8, 5, 6, 7, 8])
  heads = cfg.n_kv_heads // model_axis if cfg.n_kv_heads % model_axis == 0 else cfg.n_kv_heads
  rows = b // mesh.shape[sharding.DATA]
  per_device = {"k": (cfg.n_layers, rows, heads, cfg.head_dim, t + n), "v": (cfg.n_layers, rows, heads, t + n, cfg.head_dim)}
  whole = {"k": (cfg.n_layers, b, cfg.n_kv_heads, cfg.head_dim, t + n), "v": (cfg.n_layers, b, cfg.n_kv_heads, t + n, cfg.head_dim)}
  hlo = lambda dtype, shape: f"{dtype}[{','.join(map(str, shape))}]"
  with jax.set_mesh(mesh):
    p = sharding.shard_params(jax.tree.map(np.asarray, params), mesh, cfg)
    tk, mk = sharding.shard_batch((tokens, mask), mesh)
    prefill = jax.jit(lambda p, t, m: model.forward(p, t, cfg, attention_mask=m, cache=model.init_cache(cfg, b, t.shape[1] + n),
                                                   taps=("resid_post",))[1:])
    cache, taps = prefill(p, tk, mk)
    assert cache.k.dtype == jnp.bfloat16
    assert {s.data.shape for s in cache.k.addressable_shards} == {per_device["k"]}
    assert {s.data.shape for s in cache.v.addressable_shards} == {per_device["v"]}
    assert {s.data.shape for s in cache.key_pos.addressable_shards} == {(rows, t + n)}
    text = sampler.generate.lower(p, tk, mk, cfg, max_new_tokens=n, pad_id=0).compile().as_text()
  for kv in "kv":
    assert hlo("bf16", per_device[kv]) in text and hlo("bf16", whole[kv]) not in text
  assert {s.data.shape for s in taps["resid_post"].addressable_shards} == {(cfg.n_layers, rows, t, cfg.d_model)}


@pytest.mark.parametrize("tied", [False, True])
def test_a_vocabulary_the_model_axis_does_not_divide_is_padded_and_masked(tied):
  """Vocabulary 97 on a model axis of 4: the loader pads the embedding (and unembedding) to
  100 rows so they split 4 ways instead of being replicated, and the compiled forward keeps
  the Megatron all-reduces only. The padded logits are PADDED_LOGIT; the real ones equal one
  device's; greedy and sampled generation give one device's tokens for the same key; the gap
  (full-logit and projection-free paths) and a logit bias are those of the unpadded model;
  the params' digest (model_identity) is that of the unpadded params."""
  from valuedist.studies import engine
  from valuedist.values import anchor_edit, gap
  from valuedist.values.anchors import Anchors
  variant = "llama-bias-tied" if tied else "llama"
  _, cfg, params = hf_tiny.build(variant, vocab_size=97)
  mesh = sharding.make_mesh(2, 4)
  host = jax.tree.map(np.asarray, params)
  p = sharding.shard_params(host, mesh, cfg)
  embed = p["embed"]["embedding"]
  assert embed.shape == (100, cfg.d_model) and {s.data.shape for s in embed.addressable_shards} == {(25, cfg.d_model)}
  if not tied:
    assert {s.data.shape for s in p["unembed"]["kernel"].addressable_shards} == {(cfg.d_model, 25)}
  assert engine.digest(*jax.tree.leaves(sharding.unpad_vocab(p, 97))) == engine.digest(*jax.tree.leaves(host))

  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(0), 94, [5, 6, 7, 8, 5, 6, 7, 8])
  t, m = sharding.shard_batch((tokens, mask), mesh)
  fwd = jax.jit(model.forward, static_argnames="cfg")
  compiled = fwd.lower(p, t, cfg, attention_mask=m).compile()
  assert _collectives(compiled.as_text()) == {"all-reduce": 3}
  z = np.asarray(compiled(p, t, attention_mask=m)[0])
  ref = np.asarray(model.forward(params, jnp.asarray(tokens), cfg, attention_mask=jnp.asarray(mask))[0])
  assert z.shape[-1] == 100 and (z[..., 97:] == model.PADDED_LOGIT).all()
  np.testing.assert_allclose(z[..., :97], ref, atol=1e-5)

  for kw in (dict(), dict(key=jax.random.PRNGKey(3), sample=True, temperature=1.0, top_k=0)):
    got = sampler.generate(p, t, m, cfg, max_new_tokens=6, **kw).tokens
    want = sampler.generate(params, jnp.asarray(tokens), jnp.asarray(mask), cfg, max_new_tokens=6, **kw).tokens
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

  ids = np.asarray([[[3, 5, 7], [11, 13, 0]], [[17, 19, 23], [29, 31, 37]]], np.int32)
  amask = np.asarray([[[1, 1, 1], [1, 1, 0]], [[1, 1, 1], [1, 1, 1]]], bool)
  anchors = Anchors(jnp.asarray(ids), jnp.asarray(amask), ("a", "b"), vocab=97)
  for variant_name, want in gap.gap_from_logits(jnp.asarray(ref), anchors).items():
    np.testing.assert_allclose(np.asarray(gap.gap_from_logits(jnp.asarray(z), anchors)[variant_name]), np.asarray(want),
                               rtol=1e-5, atol=1e-5, err_msg=variant_name)
  normed = gap.teacher_forced_gaps(p, t, m, anchors, gap.unembed_stats(p, anchors, cfg), cfg)
  full = gap.teacher_forced_gaps(params, jnp.asarray(tokens), jnp.asarray(mask), anchors, None, cfg)
  np.testing.assert_allclose(np.asarray(normed["normalised"]), np.asarray(full["normalised"]), rtol=1e-4, atol=1e-5)
  bias = anchor_edit.LogitBias.create(anchors, "a", cfg.vocab_size, beta=2.0)
  np.testing.assert_allclose(np.asarray(bias.edit("logits", jnp.asarray(z), None))[..., :97], np.asarray(bias.edit("logits", jnp.asarray(ref), None)), atol=1e-5)


def _steering_cases(cfg, b):
  """Interventions with per-row fields: per-row CAA-style vectors and scales, and the ConVA
  edit gated per prompt (its decode edit holds per-row vectors)."""
  from valuedist.values import conva
  rng = np.random.default_rng(1)
  caa = model.AddToResidual(jnp.asarray(0.2 * rng.standard_normal((b, cfg.n_layers, cfg.d_model)), jnp.float32),
                            jnp.linspace(0.0, 2.0, b))
  gate = jnp.asarray(np.arange(b) % 2, jnp.float32)
  edit = conva.GatedMinimalActivation(jnp.asarray(rng.standard_normal((cfg.n_layers, cfg.d_model)), jnp.float32),
                                      jnp.zeros(cfg.n_layers), jnp.asarray([0.0, 1.0, 1.0]), jnp.asarray(2.0), gate)
  return {"none": None, "caa": caa, "conva": edit}


@pytest.mark.parametrize("data,model_axis", [(8, 1), (4, 2)])
def test_data_parallel_generate_equals_generate(data, model_axis):
  """sampler.generate_data_parallel (shard_map over data, each shard its own decode loop) gives
  generate's tokens and lengths on one device: greedy, sampled (row keys), and with per-row
  interventions (their per-row fields split with the rows); the observer's gap per step agrees
  wherever a row is still generating; the ConVA decode edit comes back split on data."""
  from valuedist.values import gap
  from valuedist.values.anchors import Anchors
  _, cfg, params = hf_tiny.build("llama")
  mesh = sharding.make_mesh(data, model_axis)
  b = 8
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(0), cfg.vocab_size - 3, [5, 6, 7, 8, 5, 6, 7, 8])
  p = sharding.shard_params(jax.tree.map(np.asarray, params), mesh, cfg)
  t, m = sharding.shard_batch((tokens, mask), mesh)
  anchors = Anchors(jnp.asarray([[[3, 4], [5, 6]]], jnp.int32), jnp.ones((1, 2, 2), bool), ("x",))
  eos = jnp.asarray([7, 9], jnp.int32)
  for name, iv in _steering_cases(cfg, b).items():
    for kw in (dict(), dict(key=jax.random.PRNGKey(3), sample=True, temperature=0.8, top_k=20)):
      common = dict(max_new_tokens=6, eos_ids=eos, pad_id=0, intervene=iv, observe=gap.observe_gap, observe_aux=anchors, **kw)
      want = sampler.generate(params, jnp.asarray(tokens), jnp.asarray(mask), cfg, **common)
      with jax.set_mesh(mesh):                                  # as the studies run it: model constraints inside
        got = sampler.generate_data_parallel(p, t, m, cfg, mesh=mesh, **common)
      np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens), err_msg=f"{name} {kw}")
      np.testing.assert_array_equal(np.asarray(got.lengths), np.asarray(want.lengths))
      live = np.arange(6)[:, None] < np.asarray(want.lengths)[None]               # [N, B] steps a row generated
      np.testing.assert_allclose(np.asarray(got.observed["mean"])[live], np.asarray(want.observed["mean"])[live], atol=1e-5)
      if name == "conva":
        assert got.decode_intervention.vectors.sharding.spec[0] == sharding.DATA
        np.testing.assert_allclose(np.asarray(got.decode_intervention.vectors), np.asarray(want.decode_intervention.vectors),
                                   atol=1e-5)


def test_data_parallel_decode_steps_meet_no_other_device():
  """Compiled on 8 data devices, generate's while loop checks `all rows done` across devices
  at every step (a cross-device all-reduce per step); generate_data_parallel's compiled
  program has no collective at all."""
  _, cfg, params = hf_tiny.build("llama")
  mesh = sharding.make_mesh(8, 1)
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(0), cfg.vocab_size - 3, [5, 6, 7, 8, 5, 6, 7, 8])
  p = sharding.shard_params(jax.tree.map(np.asarray, params), mesh, cfg)
  t, m = sharding.shard_batch((tokens, mask), mesh)
  kw = dict(max_new_tokens=4, eos_ids=jnp.asarray([7], jnp.int32), pad_id=0)
  gspmd = sampler.generate.lower(p, t, m, cfg, **kw).compile().as_text()
  mapped = sampler.generate_data_parallel.lower(p, t, m, cfg, mesh=mesh, **kw).compile().as_text()
  assert _collectives(gspmd).get("all-reduce", 0) >= 1
  assert _collectives(mapped) == {}


def test_sampling_on_a_split_vocabulary_gathers_no_logits():
  """Sampled generation with top-k and top-p on a vocabulary split 4 ways: the compiled program
  all-gathers nothing of vocabulary width (the filters' cuts are found by reductions, not by a
  sort of the gathered [B, V] row, which the sort-based filter needed), and the tokens are one
  device's for the same key."""
  _, cfg, params = hf_tiny.build("llama", vocab_size=96)
  mesh = sharding.make_mesh(2, 4)
  p = sharding.shard_params(jax.tree.map(np.asarray, params), mesh, cfg)
  assert {s.data.shape for s in p["unembed"]["kernel"].addressable_shards} == {(cfg.d_model, 24)}
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(0), 90, [5, 6, 7, 8, 5, 6, 7, 8])
  t, m = sharding.shard_batch((tokens, mask), mesh)
  for knobs in (dict(top_k=20, top_p=0.9), dict(top_k=0, top_p=0.8), dict(top_k=5, top_p=1.0)):
    kw = dict(max_new_tokens=6, key=jax.random.PRNGKey(3), sample=True, temperature=0.8, **knobs)
    with jax.set_mesh(mesh):
      text = sampler.generate.lower(p, t, m, cfg, **kw).compile().as_text()
      got = sampler.generate(p, t, m, cfg, **kw).tokens
    gathered = re.findall(r"= \w+\[([\d,]*)\]\S* all-gather\(", text)
    assert not [s for s in gathered if "96" in s.split(",")], gathered
    want = sampler.generate(params, jnp.asarray(tokens), jnp.asarray(mask), cfg, **kw).tokens
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=str(knobs))
