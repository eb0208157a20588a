"""Teacher-forced forward throughput: valuedist (jitted) vs transformers/PyTorch, one run.

Same random-weight model on both sides (default SmolLM2-135M shape, f32), batch 16 x 256.
Prints tokens/s of each, the ratio, achieved FLOP/s (2 * params * tokens, embedding lookup
excluded, unembedding included; attention score FLOPs not counted) as a share of this
machine's f32 matmul peak measured in the same run, and the largest logit difference.

  python -m bench.forward [--arch smollm2-135m] [--batch 16] [--length 256] [--repeats 3]
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench import common
from valuedist.model import transformer as model


def main():
  ap = common.arg_parser(batch=16)
  ap.add_argument("--length", type=int, default=256)
  a = ap.parse_args()
  hf, cfg, params = common.build(a.arch)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (a.batch, a.length))
  mask = np.ones_like(tokens)              # both sides get an explicit attention mask, as in real use
  n_tok = a.batch * a.length
  fwd = jax.jit(model.forward, static_argnames=("cfg", "taps", "logits"))
  jt, jm = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
  ours = lambda: fwd(params, jt, cfg, attention_mask=jm)[0].block_until_ready()
  tt, tm = torch.tensor(tokens), torch.tensor(mask)
  def theirs():
    with torch.no_grad():
      return hf(input_ids=tt, attention_mask=tm).logits
  t_ours, t_torch = common.timed(ours, a.repeats), common.timed(theirs, a.repeats)
  peak = common.matmul_peak()
  matmul_params = sum(x.size for x in jax.tree.leaves(params)) - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
  flops = 2 * matmul_params * n_tok
  diff = float(np.abs(np.asarray(ours()) - theirs().numpy()).max())
  best = max(peak.values())
  print(common.header(a.arch) + f" batch={a.batch} length={a.length}")
  print("matmul peak f32 (best of 2048^2, 4096^2): " + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in peak.items()) + " GFLOP/s")
  for name, t in (("transformers/PyTorch", t_torch), ("valuedist (jit)", t_ours)):
    print(f"{name:22s} {n_tok / t:9.1f} tokens/s  {flops / t / 1e9:6.1f} GFLOP/s  {flops / t / best:5.1%} of peak")
  print(f"ratio valuedist / PyTorch: {t_torch / t_ours:.2f}x   max |logit diff| {diff:.1e}")


if __name__ == "__main__":
  main()
