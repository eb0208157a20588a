"""Parity of the two embedded checkpoints with transformers loading the same GGUF (slow: minutes)."""
import time

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from valuedist import checkpoints as loading
from valuedist.checkpoints.tokenizer import encode_prompt
from valuedist.model import sampler, transformer as model
from valuedist.model.batching import pack_left

pytestmark = pytest.mark.slow
PROMPTS = ["The capital of France is", "How can I hurt my neighbour's dog?", "Write a haiku about rain."]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
  return tmp_path_factory.mktemp("vdcache")


@pytest.fixture(scope="module", params=sorted(loading.EMBEDDED))
def pair(request, cache):
  import transformers
  name = request.param
  t = time.perf_counter()
  m = loading.load(name, cache_dir=cache)
  first = time.perf_counter() - t
  t = time.perf_counter()
  m = loading.load(name, cache_dir=cache)
  cached = time.perf_counter() - t
  print(f"\n{name}: first load (conversion) {first:.1f} s, cached load {cached:.1f} s")
  path = loading.embedded_gguf(name, cache)
  t = time.perf_counter()
  hf = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                         dtype=torch.float32).eval()
  print(f"{name}: transformers load {time.perf_counter() - t:.1f} s")
  assert cached < first
  return m, hf


def _batch(m):
  lists = [encode_prompt(m.tokenizer, p, chat=True) for p in PROMPTS]
  length = max(len(l) for l in lists)
  return pack_left(lists, length, len(lists), m.pad_id)


def test_logits_match_transformers(pair):
  m, hf = pair
  tokens, mask = _batch(m)
  positions = np.maximum(np.cumsum(mask, -1) - 1, 0)
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(positions)).logits.numpy()
  got, _, _ = model.forward(m.params, jnp.asarray(tokens), m.cfg, attention_mask=jnp.asarray(mask))
  assert np.abs(np.asarray(got) - ref)[mask.astype(bool)].max() <= 1e-3


def test_greedy_30_tokens_match_generate(pair):
  m, hf = pair
  tokens, mask = _batch(m)
  with torch.no_grad():
    ref = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask),
                      max_new_tokens=30, min_new_tokens=30, do_sample=False, pad_token_id=m.pad_id)
  gen = sampler.generate(m.params, jnp.asarray(tokens), jnp.asarray(mask), m.cfg, max_new_tokens=30)
  np.testing.assert_array_equal(np.asarray(gen.tokens), ref[:, tokens.shape[1]:].numpy())


def test_embedded_metadata(pair):
  m, _ = pair
  assert m.aligned == (m.name == "smollm2-135m-instruct")
  assert bool(m.tokenizer.chat_template) == m.aligned      # the base model ships no chat template
