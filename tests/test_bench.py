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


def test_roofline_names_the_bound_and_the_most_of_each_limit():
  """A program is as slow as its slower limit: at 1 GB/s and 10 GFLOP/s, 2 GB and 5 GFLOP take
  at least 2 s, bound by bandwidth, with at most 25% of the peak usable; 2 GB and 40 GFLOP take
  4 s, bound by compute, with at most 50% of the bandwidth usable."""
  lim = {"bandwidth": 1e9, "flops": 1e10}
  r = common.roofline(2e9, 5e9, lim)
  assert r == {"floor_s": 2.0, "bound": "bandwidth", "max_bandwidth_share": 1.0, "max_peak_share": 0.25}
  r = common.roofline(2e9, 4e10, lim)
  assert r == {"floor_s": 4.0, "bound": "compute", "max_bandwidth_share": 0.5, "max_peak_share": 1.0}


@pytest.mark.parametrize("layout", ["stacked", "unstacked"])
@pytest.mark.parametrize("variant", ["llama", "gemma3"])
def test_matmul_chain_runs_every_kernel_of_the_model_once(variant, layout):
  """common.matmul_chain, the ceiling the benchmarks print, is the model's own matmuls and
  nothing else: its compiled program keeps one dot per projection kernel of every layer and
  the unembedding (none dead-code eliminated), reads them in the params' layout, and XLA
  counts 2 * matmul params * rows FLOPs in it (the elementwise glue under 1%); and a decode
  step in `generate_flops` costs exactly that per row."""
  from valuedist.model import params as P
  _, cfg, params = hf_tiny.build(variant)
  params = P.with_layout(params, layout)
  rows = 6
  fn, args = common.matmul_chain(params, cfg, rows)
  compiled = fn.lower(*args).compile()
  dots = compiled.as_text().count(" dot(")
  kernels = 7 if "gate" in (params["blocks"][0] if layout == "unstacked" else params["blocks"])["mlp"] else 6
  assert dots == (kernels * cfg.n_layers if layout == "unstacked" else kernels) + 1
  flops = 2 * common.matmul_params(params, cfg) * rows
  if layout == "unstacked":                   # XLA counts a while loop's body once
    assert abs(compiled.cost_analysis()["flops"] - flops) < 0.01 * flops
  step = common.generate_flops(params, cfg, rows, 5, 1) - common.generate_flops(params, cfg, rows, 5, 0)
  assert step == flops
  assert fn(*args).shape == (rows, params["embed"]["embedding"].shape[0])
