"""Greedy generation throughput: valuedist's jitted KV-cache sampler vs transformers.generate.

Same random-weight model (default SmolLM2-135M shape, f32), batch 8, 32-token prompts,
64 new tokens (no EOS, so every row generates all of them), valuedist in both params layouts
(stacked blocks under lax.scan, unstacked blocks in an unrolled loop: `model.params`).
Measured in the same run first: this machine's matmul peak and read bandwidth.

Prints for each side: generated tokens/s (prefill included), the decode step time (from
runs of `new` and of 1 new token: (t_new - t_1) / (new - 1)), the bytes a step must read
(weights + KV cache to the mean position, `common.decode_bytes`) per step time as a share of
the read bandwidth and the step's matmul FLOPs as a share of the matmul peak, valuedist's compile time (lower + compile, timed apart), the ratio to
transformers, and whether the tokens are identical. Also printed: the roofline (the least
time such a step can take here, and so the most of each limit it can use), and the step's
own matmuls run alone at B rows in the same layout (`common.matmul_chain`), the ceiling
XLA's matmuls set on this machine. With --dtype bfloat16 both sides run bf16
and valuedist's tokens are also compared with its own f32 run.

  python -m bench.generate [--arch smollm2-135m] [--batch 8] [--prompt 32] [--new 64]
                           [--layout both|stacked|unstacked] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench import common
from valuedist.model import params as P, sampler


def decode_times(run, new: int, repeats: int) -> tuple[float, float]:
  """(seconds for `new` tokens, seconds per decode step) of run(n_new) (blocking)."""
  t_new, t_one = common.timed(lambda: run(new), repeats), common.timed(lambda: run(1), repeats)
  return t_new, (t_new - t_one) / (new - 1)


def main():
  ap = common.arg_parser(batch=8)
  ap.add_argument("--prompt", type=int, default=32)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--layout", default="both", choices=("both",) + P.LAYOUTS)
  a = ap.parse_args()
  lim = common.limits(a.dtype)
  hf, cfg, params = common.build(a.arch, dtype=a.dtype)
  tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, (a.batch, a.prompt))
  mask = np.ones_like(tokens)
  jt, jm = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
  step_bytes = common.decode_bytes(params, cfg, a.batch, a.prompt + a.new / 2)
  layouts = P.LAYOUTS if a.layout == "both" else (a.layout,)
  rows, outputs, chains = [], {}, {}
  for layout in layouts:
    p = jax.block_until_ready(P.with_layout(params, layout))
    t0 = time.perf_counter()
    for n in (a.new, 1):
      sampler.generate.lower(p, jt, jm, cfg, max_new_tokens=n).compile()
    compile_s = (time.perf_counter() - t0) / 2
    run = lambda n, p=p: sampler.generate(p, jt, jm, cfg, max_new_tokens=n).tokens.block_until_ready()
    outputs[layout] = np.asarray(run(a.new))
    t_new, step = decode_times(run, a.new, a.repeats)
    rows.append((f"valuedist sampler, {layout}", t_new, step, compile_s))
    chains[layout] = common.chain_seconds(p, cfg, a.batch, max(a.repeats, 7))
  tt, tm = torch.tensor(tokens), torch.tensor(mask)

  def theirs(n):
    with torch.no_grad():
      return hf.generate(input_ids=tt, attention_mask=tm, max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, pad_token_id=0)
  t_torch, step_torch = decode_times(theirs, a.new, a.repeats)
  torch_tokens = theirs(a.new)[:, a.prompt:].numpy()
  n = a.batch * a.new
  print(common.header(a.arch) + f" dtype={a.dtype} batch={a.batch} prompt={a.prompt} new={a.new}")
  print(common.limits_line(lim) + f"; a decode step reads {step_bytes / 1e6:.0f} MB "
        f"(limit {lim['bandwidth'] / step_bytes:.0f} steps/s = {a.batch * lim['bandwidth'] / step_bytes:.0f} tokens/s)")
  # A step's matmul FLOPs (2 * matmul params * B; attention over the cache not counted): at
  # larger batches a CPU step is bound by compute before bandwidth, so both shares are printed.
  step_flops = 2 * common.matmul_params(params, cfg) * a.batch
  share = lambda step: common.shares(step, step_bytes, step_flops, lim)
  print(common.roofline_line(step_bytes, step_flops, lim))
  for layout, t in chains.items():
    step = next(r[2] for r in rows if r[0].endswith(layout))
    print(f"the step's matmuls alone, {layout} (`common.matmul_chain`, {a.batch} rows): {t * 1e3:.1f} ms, {share(t)}; "
          f"the whole step takes {step / t:.2f}x that")
  print(f"{'transformers.generate':34s} {n / t_torch:8.1f} tokens/s  step {step_torch * 1e3:6.1f} ms  {share(step_torch)}")
  for name, t, step, compile_s in rows:
    print(f"{name:34s} {n / t:8.1f} tokens/s  step {step * 1e3:6.1f} ms  {share(step)}  "
          f"ratio {t_torch / t:.2f}x  compile {compile_s:.1f} s")
  for layout, toks in outputs.items():
    print(f"identical tokens, {layout} vs transformers: {float(np.mean(np.all(toks == torch_tokens, 1))):.0%} of rows")
  if len(outputs) == 2:
    print(f"identical tokens, stacked vs unstacked: {np.array_equal(*outputs.values())}")
  if a.dtype != "float32":
    _, cfg32, params32 = common.build(a.arch)
    ref = np.asarray(sampler.generate(params32, jt, jm, cfg32, max_new_tokens=a.new).tokens)
    for layout, toks in outputs.items():
      same = float(np.mean(np.all(toks == ref, 1)))
      first = float(np.mean(toks[:, 0] == ref[:, 0]))
      print(f"{a.dtype} vs f32 valuedist, {layout}: identical rows {same:.0%}, identical first token {first:.0%}")


if __name__ == "__main__":
  main()
