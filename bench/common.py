"""Shared pieces of the benchmarks: the same random-weight model on both sides, timing, peak."""
from __future__ import annotations

import argparse

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from valuedist.model import families, params as P

ARCHS = {
    "smollm2-135m": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)),
    "gemma3-270m": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768)),
}


def arg_parser(batch: int) -> argparse.ArgumentParser:
  """The flags every benchmark takes (--arch, --batch, --repeats); scripts add their own."""
  ap = argparse.ArgumentParser()
  ap.add_argument("--arch", default="smollm2-135m", choices=sorted(ARCHS))
  ap.add_argument("--batch", type=int, default=batch)
  ap.add_argument("--repeats", type=int, default=3)
  return ap


def build(arch: str, seed: int = 0):
  """(torch model, valuedist cfg, params): identical random weights on both sides, f32."""
  torch.manual_seed(seed)
  hf = ARCHS[arch]().eval()
  cfg = families.config_from_hf(hf.config)
  params = jax.tree.map(jnp.asarray, P.convert(((k, v.numpy()) for k, v in hf.state_dict().items()), cfg))
  return hf, cfg, params


def timed(fn, repeats: int, warmups: int = 1) -> float:
  """Median seconds of `repeats` calls after `warmups` warm-up calls; fn must block until done."""
  for _ in range(warmups):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def matmul_peak(sizes=(2048, 4096), repeats: int = 3) -> dict[str, float]:
  """Best f32 square-matmul FLOP/s over `sizes` with numpy, jitted jnp and torch on this machine."""
  out = {"numpy": 0.0, "jax": 0.0, "torch": 0.0}
  mm = jax.jit(lambda x: x @ x)
  for n in sizes:
    a = np.random.RandomState(0).randn(n, n).astype(np.float32)
    ja, ta = jnp.asarray(a), torch.from_numpy(a)
    flops = 2 * n ** 3
    out["numpy"] = max(out["numpy"], flops / timed(lambda: a @ a, repeats))
    out["jax"] = max(out["jax"], flops / timed(lambda: mm(ja).block_until_ready(), repeats))
    out["torch"] = max(out["torch"], flops / timed(lambda: ta @ ta, repeats))
  return out


def read_bandwidth(mib: int = 512, repeats: int = 3) -> dict[str, float]:
  """Best read bytes/s of a sum over a `mib` MiB f32 array, in numpy and in jitted jax: the
  memory-stream limit a weight-bound decode step is measured against."""
  x = np.random.RandomState(0).rand(mib * 2**20 // 4).astype(np.float32)
  jx = jnp.asarray(x)
  total = jax.jit(jnp.sum)
  return {"numpy": x.nbytes / timed(lambda: x.sum(), repeats),
          "jax": x.nbytes / timed(lambda: total(jx).block_until_ready(), repeats)}


def header(arch: str) -> str:
  return (f"arch={arch} torch_threads={torch.get_num_threads()} jax={jax.__version__} "
          f"backend={jax.devices()[0].platform} torch={torch.__version__}")
