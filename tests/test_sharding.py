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
