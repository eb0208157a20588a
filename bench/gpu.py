"""Accelerator benchmark: valuedist vs transformers/PyTorch on one GPU, bf16, in one run.

Same random weights on both sides (default: the Llama-3.2-1B shape, 1.24 B parameters, plain
RoPE), bf16 weights and matmuls on both. Measured in the same run, before the models:
  * the bf16 matmul peak (8192^3 products, best of jax and torch),
  * the read bandwidth (a sum over a 4 GiB bf16 array, best of jax and torch).
Then:
  * forward: teacher-forced logits of a [B, T] batch (attention mask given to both sides);
    FLOPs = 2 * matmul params * tokens + 2 * causal attention (q.k and p.v, half of S^2);
    prints tokens/s, ratio, share of the matmul peak, and max |logit diff| / logit scale;
  * decode: greedy generation, `sampler.generate` (one jitted prefill + while_loop) against
    `transformers.generate` (its default dynamic cache); share of the read-bandwidth limit with
    bytes per step = all weights + the KV cache up to the mean position; whether tokens agree
    (bf16 on two stacks: argmax ties differ, so the share of identical rows is printed).

  python -m bench.gpu [--arch llama-1b] [--batch 32] [--length 1024] [--decode-batch 64]
                      [--prompt 128] [--new 128] [--json FILE]
"""
from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from bench.common import ARCHS, cast, timed
from valuedist.model import families, params as P, sampler, transformer as model

DEV = "cuda" if torch.cuda.is_available() else "cpu"   # cpu: only to check the script runs


def sync():
  if DEV == "cuda":
    torch.cuda.synchronize()


def cuda_timed(fn, repeats: int) -> float:
  """Median seconds of `repeats` calls after two warm-ups (the GPU's clocks and autotuning)."""
  return timed(fn, repeats, warmups=2)


def peaks(repeats: int) -> dict:
  """bf16 matmul FLOP/s and read bytes/s, each in jax and torch."""
  n = 8192 if DEV == "cuda" else 1024
  out = {}
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
  mm = jax.jit(lambda x: x @ x)
  out["matmul_jax"] = 2 * n ** 3 / cuda_timed(lambda: mm(a).block_until_ready(), repeats)
  ta = torch.randn(n, n, device=DEV, dtype=torch.bfloat16)
  def tmm():
    ta @ ta
    sync()
  out["matmul_torch"] = 2 * n ** 3 / cuda_timed(tmm, repeats)
  m = 2 * 1024 ** 3 if DEV == "cuda" else 2 ** 24   # 2 Gi bf16 elements = 4 GiB
  big = jnp.ones((m // 4096, 4096), jnp.bfloat16)
  red = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
  out["read_jax"] = 2 * m / cuda_timed(lambda: red(big).block_until_ready(), repeats)
  big = None  # frees the 4 GiB before torch allocates its own
  tbig = torch.ones(m // 4096, 4096, device=DEV, dtype=torch.bfloat16)
  def tred():
    tbig.sum(dtype=torch.float32)
    sync()
  out["read_torch"] = 2 * m / cuda_timed(tred, repeats)
  tbig = None
  if DEV == "cuda":
    torch.cuda.empty_cache()
  return out


def build(arch: str):
  """(torch bf16 model on cuda, valuedist cfg with bf16 matmuls, bf16 params on the GPU)."""
  torch.manual_seed(0)
  with torch.device(DEV):
    hf = cast(ARCHS[arch](), torch.bfloat16).eval()
  cfg = families.config_from_hf(hf.config).replace(compute_dtype="bfloat16")
  state = ((k, v.float().cpu().numpy()) for k, v in hf.state_dict().items())
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), P.convert(state, cfg))
  return hf, cfg, params


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--arch", default="llama-1b", choices=sorted(ARCHS))
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--length", type=int, default=1024)
  ap.add_argument("--decode-batch", type=int, default=64)
  ap.add_argument("--prompt", type=int, default=128)
  ap.add_argument("--new", type=int, default=128)
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--json", default="")
  a = ap.parse_args()
  dev = jax.devices()[0]
  rec = {"arch": a.arch, "device": dev.device_kind, "torch_device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu",
         "jax": jax.__version__, "torch": torch.__version__, "transformers": transformers.__version__}
  print(json.dumps(rec))
  pk = peaks(a.repeats)
  mm_peak, bw_peak = max(pk["matmul_jax"], pk["matmul_torch"]), max(pk["read_jax"], pk["read_torch"])
  rec["peaks"] = pk
  print(f"bf16 matmul 8192^3: jax {pk['matmul_jax'] / 1e12:.0f}, torch {pk['matmul_torch'] / 1e12:.0f} TFLOP/s;"
        f"  read 4 GiB: jax {pk['read_jax'] / 1e12:.2f}, torch {pk['read_torch'] / 1e12:.2f} TB/s", flush=True)

  hf, cfg, params = build(a.arch)
  n_params = sum(x.size for x in jax.tree.leaves(params))
  mm_params = n_params - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)
  rec["params"] = int(n_params)

  # -- forward
  b, s = a.batch, a.length
  tokens = np.random.RandomState(0).randint(3, cfg.vocab_size, (b, s))
  mask = np.ones_like(tokens)
  fwd = jax.jit(model.forward, static_argnames=("cfg", "taps", "logits"))
  jt, jm = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
  ours = lambda: fwd(params, jt, cfg, attention_mask=jm)[0].block_until_ready()
  tt, tm = torch.tensor(tokens, device=DEV), torch.tensor(mask, device=DEV)
  def theirs():
    with torch.no_grad():
      out = hf(input_ids=tt, attention_mask=tm).logits
    sync()
    return out
  t_ours, t_torch = cuda_timed(ours, a.repeats), cuda_timed(theirs, a.repeats)
  lo, lt = np.asarray(ours(), np.float32), theirs().float().cpu().numpy()
  diff, scale = float(np.abs(lo - lt).max()), float(np.abs(lt).max())
  argmax_same = float(np.mean(lo.argmax(-1) == lt.argmax(-1)))
  del lo, lt
  attn_flops = 2 * 2 * cfg.n_layers * b * (s * (s + 1) // 2) * cfg.n_heads * cfg.head_dim
  flops = 2 * mm_params * b * s + attn_flops
  rec["forward"] = {"batch": b, "length": s, "torch_tok_s": b * s / t_torch, "valuedist_tok_s": b * s / t_ours,
                    "ratio": t_torch / t_ours, "torch_share_of_peak": flops / t_torch / mm_peak,
                    "valuedist_share_of_peak": flops / t_ours / mm_peak, "max_abs_logit_diff": diff,
                    "logit_scale": scale, "argmax_agreement": argmax_same}
  print(f"forward B={b} T={s}: transformers {b * s / t_torch:,.0f} tok/s ({flops / t_torch / mm_peak:.1%} of peak), "
        f"valuedist {b * s / t_ours:,.0f} tok/s ({flops / t_ours / mm_peak:.1%}), ratio {t_torch / t_ours:.2f}x; "
        f"max|dlogit| {diff:.3g} of {scale:.3g}, argmax agree {argmax_same:.1%}", flush=True)
  del tt, tm
  if DEV == "cuda":
    torch.cuda.empty_cache()

  # -- decode
  db, p, n = a.decode_batch, a.prompt, a.new
  tokens = np.random.RandomState(1).randint(3, cfg.vocab_size, (db, p))
  mask = np.ones_like(tokens)
  jt, jm = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)
  t0 = time.perf_counter()
  gen = lambda: sampler.generate(params, jt, jm, cfg, max_new_tokens=n).tokens.block_until_ready()
  gen()
  compile_s = time.perf_counter() - t0
  tt, tm = torch.tensor(tokens, device=DEV), torch.tensor(mask, device=DEV)
  def tgen():
    with torch.no_grad():
      out = hf.generate(input_ids=tt, attention_mask=tm, max_new_tokens=n, min_new_tokens=n,
                        do_sample=False, pad_token_id=0)
    sync()
    return out
  t_ours, t_torch = cuda_timed(gen, max(2, a.repeats // 2)), cuda_timed(tgen, max(2, a.repeats // 2))
  ot, tt_out = np.asarray(gen()), tgen()[:, p:].cpu().numpy()
  same_rows = float(np.mean(np.all(ot == tt_out, -1)))
  first_same = float(np.mean(ot[:, 0] == tt_out[:, 0]))
  kv_bytes_step = 2 * cfg.n_layers * db * (p + n / 2) * cfg.n_kv_heads * cfg.head_dim * 2
  step_bytes = 2 * n_params + kv_bytes_step
  def share(t):
    return step_bytes * n / t / bw_peak
  rec["decode"] = {"batch": db, "prompt": p, "new": n, "torch_tok_s": db * n / t_torch,
                   "valuedist_tok_s": db * n / t_ours, "ratio": t_torch / t_ours,
                   "torch_share_of_read_bw": share(t_torch), "valuedist_share_of_read_bw": share(t_ours),
                   "valuedist_compile_s": compile_s, "identical_rows": same_rows, "first_token_agreement": first_same}
  print(f"decode B={db} prompt={p} new={n}: transformers.generate {db * n / t_torch:,.0f} tok/s "
        f"({share(t_torch):.1%} of read bw), valuedist {db * n / t_ours:,.0f} tok/s ({share(t_ours):.1%}), "
        f"ratio {t_torch / t_ours:.2f}x; compile {compile_s:.1f} s; identical rows {same_rows:.0%}, "
        f"first token agree {first_same:.0%}", flush=True)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rec, f, indent=1)


if __name__ == "__main__":
  main()
