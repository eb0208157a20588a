"""Greedy generation throughput: valuedist's jitted KV-cache sampler vs transformers.generate.

Same random-weight model (default SmolLM2-135M shape, f32), batch 8, 32-token prompts,
64 new tokens (no EOS, so every row generates all of them). Compilation is timed apart.
Prints generated tokens/s for both, the ratio, and whether the tokens are identical.

  python -m bench.generate [--arch smollm2-135m] [--batch 8] [--prompt 32] [--new 64]
"""
from __future__ import annotations

import time

import jax.numpy as jnp
import numpy as np
import torch

from bench import common
from valuedist.model import sampler


def main():
  ap = common.arg_parser(batch=8)
  ap.add_argument("--prompt", type=int, default=32)
  ap.add_argument("--new", type=int, default=64)
  a = ap.parse_args()
  hf, cfg, params = common.build(a.arch)
  tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, (a.batch, a.prompt))
  mask = np.ones_like(tokens)
  jt, jm = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
  t0 = time.perf_counter()
  run = lambda: sampler.generate(params, jt, jm, cfg, max_new_tokens=a.new).tokens.block_until_ready()
  run()
  compile_s = time.perf_counter() - t0
  tt, tm = torch.tensor(tokens), torch.tensor(mask)
  def theirs():
    with torch.no_grad():
      return hf.generate(input_ids=tt, attention_mask=tm, max_new_tokens=a.new, min_new_tokens=a.new,
                         do_sample=False, pad_token_id=0)
  t_ours, t_torch = common.timed(run, a.repeats), common.timed(theirs, a.repeats)
  same = np.array_equal(np.asarray(run()), theirs()[:, a.prompt:].numpy())
  n = a.batch * a.new
  print(common.header(a.arch) + f" batch={a.batch} prompt={a.prompt} new={a.new}")
  print(f"transformers.generate   {n / t_torch:8.1f} tokens/s")
  print(f"valuedist sampler (jit) {n / t_ours:8.1f} tokens/s   (first call incl. compile {compile_s:.1f} s)")
  print(f"ratio valuedist / transformers: {t_torch / t_ours:.2f}x   identical tokens: {same}")


if __name__ == "__main__":
  main()
