"""Gap-measurement throughput: valuedist vs a transformers/PyTorch implementation, one run.

Teacher-forced scoring of a batch (default 16 x 256 tokens) on a SmolLM2-135M-shaped model
(or --arch=gemma3-270m) with random weights shared by both sides; G lexicons of K anchor
ids per side. PyTorch computes full logits then the gaps (the natural implementation);
valuedist skips the vocabulary projection (anchor columns + centred Gram moments) and is
also timed on its full-logit path. Measured in the same run first: this machine's matmul
peak and read bandwidth. Prints tokens/s for each, the ratios, achieved FLOP/s as a share of
the peak (full logits: 2 * (block params + V * D) * tokens; projection-free: the unembedding
replaced by the anchor columns and the D x D Gram form, 2 * (block params + 2 G K D + D^2) *
tokens; attention scores not counted), and the largest difference between the two sides' gaps.

  python -m bench.gap [--batch 16] [--length 256] [--arch smollm2-135m|gemma3-270m]
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench import common
from valuedist.values import gap
from valuedist.values.anchors import Anchors


def torch_gaps(model, tokens, mask, ids, amask):
  """The same measurement in PyTorch: full logits, then mean/max/lse/normalised gaps [B, T, G]."""
  with torch.no_grad():
    z = model(input_ids=tokens, attention_mask=mask).logits.float()
    za = z[..., ids]                                                     # [B, T, G, 2, K]
    m = amask.float()
    mean = (za * m).sum(-1) / m.sum(-1)
    masked = za.masked_fill(~amask, float("-inf"))
    d = lambda x: x[..., 0] - x[..., 1]
    out = {"mean": d(mean), "max": d(masked.amax(-1)), "lse": d(torch.logsumexp(masked, -1))}
    out["normalised"] = out["mean"] / z.std(-1, unbiased=False)[..., None]
    return out


def main():
  ap = common.arg_parser(batch=16)
  ap.add_argument("--length", type=int, default=256)
  ap.add_argument("--lexicons", type=int, default=13)
  ap.add_argument("--anchors", type=int, default=60, help="anchor ids per side")
  a = ap.parse_args()
  lim = common.limits()
  hf, cfg, params = common.build(a.arch)
  rng = np.random.RandomState(0)
  ids = rng.randint(0, cfg.vocab_size, (a.lexicons, 2, a.anchors)).astype(np.int32)
  amask = np.ones_like(ids, bool)
  amask[:, 1, a.anchors // 2:] = False
  anchors = Anchors(jnp.asarray(ids), jnp.asarray(amask), tuple(f"l{i}" for i in range(a.lexicons)))
  tokens = rng.randint(0, cfg.vocab_size, (a.batch, a.length)).astype(np.int32)
  mask = np.ones_like(tokens)
  n_tok = a.batch * a.length

  stats = gap.unembed_stats(params, anchors, cfg)
  jt, jm = jnp.asarray(tokens), jnp.asarray(mask)
  fast = lambda: jax.block_until_ready(gap.teacher_forced_gaps(params, jt, jm, anchors, stats, cfg))
  full = lambda: jax.block_until_ready(gap.teacher_forced_gaps(params, jt, jm, anchors, None, cfg))
  tt, tm = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask)
  tids, tamask = torch.tensor(ids, dtype=torch.long), torch.tensor(amask)
  ref = lambda: torch_gaps(hf, tt, tm, tids, tamask)

  t_fast, t_full, t_torch = common.timed(fast, a.repeats), common.timed(full, a.repeats), common.timed(ref, a.repeats)
  got, want = fast(), ref()
  diff = max(float(np.abs(np.asarray(got[v]) - want[v].numpy()).max()) for v in gap.VARIANTS)
  blocks = sum(x.size for x in jax.tree.leaves(params["blocks"]))
  d = cfg.d_model
  f_full = 2 * (blocks + cfg.vocab_size * d) * n_tok
  f_free = 2 * (blocks + 2 * a.lexicons * a.anchors * d + d * d) * n_tok
  share = lambda f, t: f"{f / t / 1e9:6.1f} GFLOP/s  {f / t / lim['flops']:5.1%} of peak"
  print(common.header(a.arch) + f" batch={a.batch} length={a.length} lexicons={a.lexicons} anchors/side={a.anchors}")
  print(common.limits_line(lim))
  print(f"transformers/PyTorch (full logits): {n_tok / t_torch:10.1f} tokens/s  {share(f_full, t_torch)}")
  print(f"valuedist full-logit path:          {n_tok / t_full:10.1f} tokens/s  {share(f_full, t_full)}  "
        f"({t_torch / t_full:.2f}x PyTorch)")
  print(f"valuedist projection-free path:     {n_tok / t_fast:10.1f} tokens/s  {share(f_free, t_fast)}  "
        f"({t_torch / t_fast:.2f}x PyTorch)")
  print(f"max |gap difference| valuedist vs PyTorch: {diff:.2e}")


if __name__ == "__main__":
  main()
