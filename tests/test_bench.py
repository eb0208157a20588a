"""The benchmarks' reference side is built as its users get it."""
import copy

import pytest
import torch

from bench import common
from tests import hf_tiny


@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_cast_keeps_rope_frequencies_in_f32(variant):
  """bench.common.cast puts every weight in bf16 and leaves every RoPE inverse-frequency buffer
  f32 and unchanged, as from_pretrained(dtype=bfloat16) does; a bare .to() rounds them, and
  transformers' bf16 logits then drift with position (see the function's docstring)."""
  config_cls, model_cls, kw = hf_tiny.VARIANTS[variant]
  torch.manual_seed(0)
  ref = model_cls(config_cls(**kw)).eval()
  freqs = {n: b.clone() for n, b in ref.named_buffers() if n.endswith("inv_freq")}
  assert freqs
  model = common.cast(copy.deepcopy(ref), torch.bfloat16)
  assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
  buffers = dict(model.named_buffers())
  for n, b in freqs.items():
    assert buffers[n].dtype == torch.float32 and torch.equal(buffers[n], b), n
