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


def test_op_profile_attributes_a_decode_step_to_its_compiled_ops():
  """bench.op_profile reads the trace of a decode step back into the compiled program's own ops:
  each one an instruction of the compiled HLO (no runtime wrapper, no while loop counting its
  body twice), the projections' and the attention's dots and the cache write among them, with
  positive thread times, and a wall time per call."""
  from bench import op_profile
  _, cfg, params = hf_tiny.build("llama")
  fn, make = op_profile.decode_step(params, cfg, batch=2, slots=12, filled=5)
  ops, wall = op_profile.op_times(fn, make, repeats=2)
  compiled = op_profile.hlo_ops(fn.lower(*make()).compile().as_text())
  assert ops and {o.name for o in ops} <= set(compiled)
  assert not any(o.name.startswith("while") for o in ops)
  sources = {o.source for o in ops}
  assert {"...i,io->...o/dot_general", "bkqd,bkds->bkqs/dot_general", "bkqs,bksd->bkqd/dot_general"} <= sources, sources
  assert any("dynamic_update_slice" in s for s in sources), sources
  assert all(o.seconds > 0 for o in ops) and wall > 0
