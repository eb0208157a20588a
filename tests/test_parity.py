"""Logit parity with Hugging Face transformers on tiny random models of every family."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from valuedist.model import layers, sampler, transformer as model
from tests import hf_tiny

TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(hf_tiny.VARIANTS))
def tiny(request):
  return hf_tiny.build(request.param)


def test_prefill_logits_match_with_left_padding(tiny):
  hf, cfg, params = tiny
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(1), cfg.vocab_size, [12, 7, 3])
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)   # what HF generate passes for left padding
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(positions)).logits.numpy()
  got, _, _ = model.forward(params, jnp.asarray(tokens), cfg, attention_mask=jnp.asarray(mask))
  diff = np.abs(np.asarray(got) - ref)[mask.astype(bool)]
  assert diff.max() <= TOL, diff.max()


def test_greedy_decode_matches_generate(tiny):
  hf, cfg, params = tiny
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(2), cfg.vocab_size, [9, 4])
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                      max_new_tokens=20, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
  gen = sampler.generate(params, jnp.asarray(tokens), jnp.asarray(mask), cfg, max_new_tokens=20,
                         observe=lambda logits, taps, aux: logits)
  np.testing.assert_array_equal(np.asarray(gen.tokens), ref.sequences[:, tokens.shape[1]:].numpy())
  ref_logits = torch.stack(ref.logits, 0).numpy()                   # [N, B, V]
  assert np.abs(np.asarray(gen.observed) - ref_logits).max() <= TOL


def test_cached_decode_equals_full_forward(tiny):
  """Teacher-forcing the generated tokens reproduces the per-step logits of the cached loop."""
  _, cfg, params = tiny
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(3), cfg.vocab_size, [6, 10])
  gen = sampler.generate(params, jnp.asarray(tokens), jnp.asarray(mask), cfg, max_new_tokens=8,
                         observe=lambda logits, taps, aux: logits)
  full = jnp.concatenate([jnp.asarray(tokens), gen.tokens], 1)
  full_mask = jnp.concatenate([jnp.asarray(mask), jnp.ones_like(gen.tokens)], 1)
  logits, _, _ = model.forward(params, full, cfg, attention_mask=full_mask)
  t = tokens.shape[1]
  expect = np.asarray(logits[:, t - 1:-1]).transpose(1, 0, 2)
  assert np.abs(np.asarray(gen.observed) - expect).max() <= TOL


def test_long_prompts_attend_in_query_blocks(tiny):
  """Prompts longer than layers.QUERY_BLOCK attend block by block (forward and the sampler's
  prefill); logits still match transformers, left padding included, and so does the cached
  decode after a blocked prefill."""
  hf, cfg, params = tiny
  n = layers.QUERY_BLOCK
  tokens, mask = hf_tiny.left_padded_batch(np.random.RandomState(4), cfg.vocab_size, [n + 50, n + 9, 5])
  assert tokens.shape[1] > n and tokens.shape[1] + 3 <= cfg.max_positions     # two blocks, within gpt2's 128
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
                      max_new_tokens=3, do_sample=False, output_logits=True,
                      return_dict_in_generate=True, pad_token_id=0, eos_token_id=None)
    full = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(positions)).logits.numpy()
  got, _, _ = model.forward(params, jnp.asarray(tokens), cfg, attention_mask=jnp.asarray(mask))
  assert np.abs(np.asarray(got) - full)[mask.astype(bool)].max() <= TOL
  gen = sampler.generate(params, jnp.asarray(tokens), jnp.asarray(mask), cfg, max_new_tokens=3,
                         observe=lambda logits, taps, aux: logits)
  np.testing.assert_array_equal(np.asarray(gen.tokens), ref.sequences[:, tokens.shape[1]:].numpy())
  assert np.abs(np.asarray(gen.observed) - torch.stack(ref.logits, 0).numpy()).max() <= TOL
