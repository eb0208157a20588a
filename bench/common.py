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

from valuedist.model import families, layers, params as P
from valuedist.model.transformer import unembed_kernel

ARCHS = {
    "smollm2-135m": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=2)),
    "llama-1b": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "gemma3-270m": lambda: transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=262144, hidden_size=640, intermediate_size=2048, num_hidden_layers=18, num_attention_heads=4,
        num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256, sliding_window=512,
        max_position_embeddings=32768)),
}


def arg_parser(batch: int) -> argparse.ArgumentParser:
  """The flags every benchmark takes (--arch, --batch, --repeats, --dtype); scripts add their own."""
  ap = argparse.ArgumentParser()
  ap.add_argument("--arch", default="smollm2-135m", choices=sorted(ARCHS))
  ap.add_argument("--batch", type=int, default=batch)
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                  help="weights and matmuls on both sides (norms, softmax and logits stay f32 in valuedist)")
  return ap


def build(arch: str, seed: int = 0, dtype: str = "float32"):
  """(torch model, valuedist cfg, params): identical random weights on both sides, in `dtype`
  (bfloat16: both sides' weights rounded from the same f32 draw, valuedist computing in bf16)."""
  torch.manual_seed(seed)
  hf = ARCHS[arch]().eval()
  cfg = families.config_from_hf(hf.config)
  params = jax.tree.map(jnp.asarray, P.convert(((k, v.numpy()) for k, v in hf.state_dict().items()), cfg))
  if dtype != "float32":
    hf = cast(hf, getattr(torch, dtype))
    cfg = cfg.replace(compute_dtype=dtype)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
  return hf, cfg, params


def cast(hf: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
  """`hf` with its weights in `dtype` and its RoPE inverse frequencies kept in f32, as
  `from_pretrained(dtype=...)` leaves a model. `.to(dtype)` alone also rounds those buffers,
  and the rotation angles (position x frequency) then drift with position: on the llama-1b
  shape at T = 1024, transformers' bf16 logits were off its f32 ones by up to 1.63 (0.29 in
  the first eighth of positions, 1.63 in the last), against 0.18 at every position with f32
  frequencies, the same as valuedist's bf16 error."""
  keep = {name: b.clone() for name, b in hf.named_buffers() if name.endswith("inv_freq")}
  hf = hf.to(dtype)
  for name, b in keep.items():
    owner, _, attr = name.rpartition(".")
    setattr(hf.get_submodule(owner), attr, b)
  return hf


def matmul_params(params: dict, cfg) -> int:
  """Parameters that take part in a matmul per token (the unembedding, not the embedding
  lookup): 2 x this x tokens is the FLOP count the benchmarks report."""
  n = sum(x.size for x in jax.tree.leaves(params))
  return n - (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model)


def nbytes(tree) -> int:
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


def decode_bytes(params: dict, cfg, batch: int, mean_len: float) -> float:
  """Bytes one decode step must read: every weight the step uses (the embedding table only
  when tied, where the unembedding reads all of it; untied, the lookup reads B rows) plus the
  KV cache up to the mean position."""
  weights = nbytes(params) - (0 if cfg.tie_embeddings else nbytes(params["embed"]))
  itemsize = jnp.dtype(cfg.compute_dtype).itemsize
  kv = 2 * cfg.n_layers * batch * cfg.n_kv_heads * cfg.head_dim * mean_len * itemsize
  return weights + kv


def roofline(step_bytes: float, step_flops: float, lim: dict) -> dict[str, float]:
  """The least time a program reading `step_bytes` and doing `step_flops` of matmuls can take
  on a machine of limits `lim` (bytes at the read bandwidth, FLOPs at the matmul peak, the two
  overlapped), and the most of each limit it can then use: a share target above `max_*` is
  out of reach on this machine whatever the code does.
  Returns {floor_s, bound ('bandwidth' or 'compute'), max_bandwidth_share, max_peak_share}."""
  t_bytes, t_flops = step_bytes / lim["bandwidth"], step_flops / lim["flops"]
  floor = max(t_bytes, t_flops)
  return {"floor_s": floor, "bound": "bandwidth" if t_bytes >= t_flops else "compute",
          "max_bandwidth_share": t_bytes / floor, "max_peak_share": t_flops / floor}


def roofline_line(step_bytes: float, step_flops: float, lim: dict, what: str = "a decode step") -> str:
  r = roofline(step_bytes, step_flops, lim)
  return (f"roofline: {what} ({step_bytes / 1e6:.0f} MB, {step_flops / 1e9:.2f} GFLOP) takes >= "
          f"{r['floor_s'] * 1e3:.1f} ms here, bound by {r['bound']}: at most {r['max_bandwidth_share']:.0%} "
          f"of read bandwidth and {r['max_peak_share']:.0%} of the matmul peak are attainable")


def shares(seconds: float, step_bytes: float, step_flops: float, lim: dict) -> str:
  """A program's bytes and matmul FLOPs over `seconds`, as shares of the read bandwidth and the matmul peak."""
  return (f"{step_bytes / seconds / lim['bandwidth']:5.1%} of read bandwidth, "
          f"{step_flops / seconds / lim['flops']:5.1%} of matmul peak")


def matmul_chain(params: dict, cfg, rows: int):
  """The model's own matmuls alone, for `rows` tokens: a jitted program over every layer's
  q, k, v, o, (gate,) up, down kernels and the unembedding, at the model's shapes and params
  layout (stacked under `scan`, or unstacked and unrolled), each product as the model computes
  it (`layers.dense`, bias left out), with no attention, norms, RoPE or
  activation in between (each product feeds the next, the q/k/v and gate/up outputs summed
  into their consumer's input, so none is dead code). What XLA's matmuls reach on these shapes
  here is the ceiling the model's forward or decode step is measured under.
  Returns (jitted fn, args); fn(*args) does 2 * matmul_params * rows FLOPs of matmuls."""
  d = cfg.d_model
  x0 = jnp.asarray(np.random.RandomState(1).randn(rows, d).astype(np.float32) * 0.1, cfg.compute_dtype)
  dot = lambda x, lp: layers.dense({k: v for k, v in lp.items() if k != "bias"}, x)

  def layer(x, lp):
    a, m = lp["attn"], lp["mlp"]
    q, k, v = dot(x, a["q"]), dot(x, a["k"]), dot(x, a["v"])
    kv = jnp.tile(k + v, (1, q.shape[-1] // k.shape[-1]))          # [rows, H*Dh] from [rows, K*Dh]
    h = dot(q + kv, a["o"])
    up = dot(h, m["up"]) + (dot(h, m["gate"]) if "gate" in m else 0.0)
    return dot(up, m["down"]) * 0.01

  def run(params, x):
    blocks = params["blocks"]
    if P.layout_of(params) == "unstacked":
      for lp in blocks:
        x = layer(x, lp)
    else:
      x = jax.lax.scan(lambda x, lp: (layer(x, lp), None), x, blocks)[0]
    return x @ unembed_kernel(params, cfg).astype(x.dtype)

  return jax.jit(run), (params, x0)


def chain_seconds(params: dict, cfg, rows: int, repeats: int) -> float:
  """Seconds of `matmul_chain` at `rows` rows: the best of `repeats` calls (a ceiling is the
  best the machine gave)."""
  fn, args = matmul_chain(params, cfg, rows)
  return timed(lambda: fn(*args).block_until_ready(), repeats, stat=min)


def generate_flops(params: dict, cfg, batch: int, prompt: int, steps: int) -> float:
  """Matmul FLOPs a `generate` call executes: a prefill of batch x prompt tokens through the
  blocks, the last token onto the vocabulary, then `steps` decode steps of every row (rows
  that stopped keep computing until the batch does)."""
  unembed = cfg.vocab_size * cfg.d_model
  blocks = matmul_params(params, cfg) - unembed
  return 2.0 * batch * (blocks * prompt + unembed + (blocks + unembed) * steps)


def limits(dtype: str = "float32") -> dict[str, float]:
  """This machine's limits, measured now: matmul FLOP/s in `dtype` and read bytes/s, each the
  best of numpy (f32), jax and torch (for the matmul)."""
  return {"flops": max(matmul_peak(dtype=dtype).values()), "bandwidth": max(read_bandwidth().values()),
          "dtype": dtype}


def limits_line(lim: dict) -> str:
  short = {"float32": "f32", "bfloat16": "bf16"}[lim["dtype"]]
  return (f"limits measured in this run: {short} matmul peak {lim['flops'] / 1e9:.1f} GFLOP/s, "
          f"read bandwidth {lim['bandwidth'] / 1e9:.1f} GB/s")


def timed(fn, repeats: int, warmups: int = 1, stat=statistics.median) -> float:
  """Median (or `stat`) seconds of `repeats` calls after `warmups` warm-up calls; fn must block until done."""
  for _ in range(warmups):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return stat(times)


def matmul_peak(sizes=(2048, 4096), repeats: int = 3, dtype: str = "float32") -> dict[str, float]:
  """Best square-matmul FLOP/s over `sizes` with numpy (f32 only), jitted jnp and torch on this
  machine, in `dtype` (float32 or bfloat16)."""
  out = {"numpy": 0.0, "jax": 0.0, "torch": 0.0} if dtype == "float32" else {"jax": 0.0, "torch": 0.0}
  mm = jax.jit(lambda x: x @ x)
  for n in sizes:
    a = np.random.RandomState(0).randn(n, n).astype(np.float32)
    ja, ta = jnp.asarray(a).astype(dtype), torch.from_numpy(a).to(getattr(torch, dtype))
    flops = 2 * n ** 3
    if "numpy" in out:
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
