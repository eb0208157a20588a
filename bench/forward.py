"""Teacher-forced forward throughput: valuedist (jitted) vs transformers/PyTorch, one run.

Same random-weight model on both sides (default SmolLM2-135M shape, f32), batch 16 x 256.
Measured in the same run first: this machine's matmul peak and read bandwidth. Prints
tokens/s of each side, the ratio, achieved FLOP/s (2 * matmul params * tokens, embedding
lookup excluded, unembedding included; attention score FLOPs not counted) as a share of the
matmul peak, the largest logit difference, and valuedist's compile time, for each params
layout asked for (stacked blocks under lax.scan, unstacked in an unrolled loop), and the rate
of the same matmuls run alone (`common.matmul_chain`): the ceiling XLA's matmuls at these
shapes set on this machine, which the attention, norms and activations bring the forward under. With --dtype
bfloat16 both sides run bf16, and both sides' bf16 logits are also compared with valuedist's f32 ones.

  python -m bench.forward [--arch smollm2-135m] [--batch 16] [--length 256] [--repeats 3]
                          [--layout stacked|unstacked|both] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench import common
from valuedist.model import params as P, transformer as model


def main():
  ap = common.arg_parser(batch=16)
  ap.add_argument("--length", type=int, default=256)
  ap.add_argument("--layout", default="stacked", choices=("both",) + P.LAYOUTS)
  a = ap.parse_args()
  lim = common.limits(a.dtype)
  hf, cfg, params = common.build(a.arch, dtype=a.dtype)
  tokens = np.random.RandomState(0).randint(0, cfg.vocab_size, (a.batch, a.length))
  mask = np.ones_like(tokens)              # both sides get an explicit attention mask, as in real use
  n_tok = a.batch * a.length
  fwd = jax.jit(model.forward, static_argnames=("cfg", "taps", "logits"))
  jt, jm = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
  tt, tm = torch.tensor(tokens), torch.tensor(mask)

  def theirs():
    with torch.no_grad():
      return hf(input_ids=tt, attention_mask=tm).logits
  t_torch = common.timed(theirs, a.repeats)
  want = theirs().float().numpy()
  flops = 2 * common.matmul_params(params, cfg) * n_tok
  rows, chains = [], {}
  for layout in (P.LAYOUTS if a.layout == "both" else (a.layout,)):
    p = jax.block_until_ready(P.with_layout(params, layout))
    t0 = time.perf_counter()
    fwd.lower(p, jt, cfg, attention_mask=jm).compile()
    compile_s = time.perf_counter() - t0
    ours = lambda p=p: fwd(p, jt, cfg, attention_mask=jm)[0].block_until_ready()
    t = common.timed(ours, a.repeats)
    rows.append((f"valuedist (jit), {layout}", t, compile_s, np.asarray(ours())))
    chains[layout] = common.chain_seconds(p, cfg, n_tok, a.repeats)
  print(common.header(a.arch) + f" dtype={a.dtype} batch={a.batch} length={a.length}")
  print(common.limits_line(lim))
  print(f"{'transformers/PyTorch':28s} {n_tok / t_torch:9.1f} tokens/s  {flops / t_torch / 1e9:6.1f} GFLOP/s  "
        f"{flops / t_torch / lim['flops']:5.1%} of peak")
  for name, t, compile_s, got in rows:
    print(f"{name:28s} {n_tok / t:9.1f} tokens/s  {flops / t / 1e9:6.1f} GFLOP/s  {flops / t / lim['flops']:5.1%} of peak  "
          f"ratio {t_torch / t:.2f}x  max |logit diff| {np.abs(got - want).max():.1e}  compile {compile_s:.1f} s")
  for layout, t in chains.items():
    t_ours = next(r[1] for r in rows if r[0].endswith(layout))
    print(f"its matmuls alone, {layout} (`common.matmul_chain`, {n_tok} rows; no attention, norms, RoPE or "
          f"activations): {flops / t / 1e9:6.1f} GFLOP/s, {flops / t / lim['flops']:5.1%} of peak; the forward "
          f"reaches {t / t_ours:.0%} of their rate")
  if a.dtype != "float32":
    _, cfg32, params32 = common.build(a.arch)
    ref = np.asarray(fwd(params32, jt, cfg32, attention_mask=jm)[0])
    print(f"against valuedist's f32 logits (max |f32 logit| {np.abs(ref).max():.2f}):")
    for name, got in ((f"transformers {a.dtype}", want), (f"valuedist {a.dtype}", rows[0][3])):
      print("  " + low_precision_error(name, got, ref))


def low_precision_error(name: str, got: np.ndarray, ref: np.ndarray) -> str:
  """One line: max and mean |got - ref| over logits [B, T, V], the max over the first and the
  last eighth of positions (an error that grows with position points at RoPE), and the
  argmax agreement."""
  d = np.abs(got - ref)
  eighth = max(d.shape[1] // 8, 1)
  return (f"{name}: max |logit diff| {d.max():.3f} (first eighth of positions {d[:, :eighth].max():.3f}, "
          f"last {d[:, -eighth:].max():.3f}), mean {d.mean():.4f}, argmax agreement "
          f"{np.mean(got.argmax(-1) == ref.argmax(-1)):.1%}")


if __name__ == "__main__":
  main()
