"""Which way round XLA's CPU matmul streams a decode step's weights fastest, interleaved in one run.

A chain of the SmolLM2-135M MLP's 90 products (30 layers of gate, up [576, 1536] and down
[1536, 576], f32, 318 MB, each product feeding the next as in a decode step), at B rows:
- `x @ W`: kernels stored [in, out] and used as the model does today;
- `(W_T @ x^T)^T`: kernels stored transposed [out, in], the weight on the left, with
  `lax.optimization_barrier` around the transposes of the small activations;
- the same without the barriers: XLA folds the transposes back into the product's operands.
Prints the best and median time of each over interleaved rounds, the rate at which each reads
the weights against a jitted sum over the same buffers, and whether the outputs are bitwise
equal. With --model, also the whole greedy decode step of the SmolLM2-135M shape (random
weights), interleaved: stacked, unstacked with kernels [in, out] (x @ W, the unstacked layout
before 2026-12-08) and unstacked as `params.unstack_blocks` now builds it (kernels [out, in],
the weight on the left in `layers.dense`).

  python -m bench.weight_left [--rows 1 8 32 128 256] [--rounds 7] [--model --batch 8]
"""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common

L, D, F = 30, 576, 1536
barrier = jax.lax.optimization_barrier


@jax.jit
def right(x, g, u, d):
  for i in range(L):
    x = ((x @ g[i]) + (x @ u[i])) @ d[i] * 0.01
  return x


@jax.jit
def left(x, g, u, d):
  for i in range(L):
    xt = barrier(x.T)
    h = barrier(g[i] @ xt + u[i] @ xt).T
    x = barrier(d[i] @ barrier(h.T)).T * 0.01
  return x


@jax.jit
def left_folded(x, g, u, d):
  for i in range(L):
    h = (g[i] @ x.T + u[i] @ x.T).T
    x = (d[i] @ h.T).T * 0.01
  return x


@jax.jit
def read_all(g, u, d):
  return sum(jnp.sum(a) for a in g + u + d)


def rounds(fns: dict, n: int) -> dict:
  """{name: [seconds]} of each blocking fn, called in turn for n rounds after one warm-up."""
  for f in fns.values():
    f()
  out = {k: [] for k in fns}
  for _ in range(n):
    for k, f in fns.items():
      t = time.perf_counter()
      f()
      out[k].append(time.perf_counter() - t)
  return out


def chain(rows_list, n_rounds: int):
  rng = np.random.default_rng(0)
  w = {k: [rng.standard_normal(s, np.float32) * 0.03 for _ in range(L)]
       for k, s in (("g", (D, F)), ("u", (D, F)), ("d", (F, D)))}
  kio = [[jnp.asarray(a) for a in w[k]] for k in "gud"]
  koi = [[jnp.asarray(np.ascontiguousarray(a.T)) for a in w[k]] for k in "gud"]
  nbytes = 3 * L * D * F * 4
  t_sum = min(rounds({"sum": lambda: read_all(*kio).block_until_ready()}, n_rounds)["sum"])
  print(f"a jitted sum over the same {nbytes / 1e6:.0f} MB: {t_sum * 1e3:.1f} ms, {nbytes / t_sum / 1e9:.1f} GB/s")
  for rows in rows_list:
    x = jnp.asarray(rng.standard_normal((rows, D), np.float32))
    fns = {"x @ W": lambda: right(x, *kio).block_until_ready(),
           "(W_T @ x^T)^T, barriers": lambda: left(x, *koi).block_until_ready(),
           "(W_T @ x^T)^T, folded": lambda: left_folded(x, *koi).block_until_ready()}
    ref = np.asarray(right(x, *kio))
    same = {k: np.array_equal(np.asarray(f()), ref) for k, f in fns.items()}
    times = rounds(fns, n_rounds)
    base = min(times["x @ W"])
    for k, v in times.items():
      print(f"rows {rows:4d}  {k:26s} best {min(v) * 1e3:7.1f} ms  median {np.median(v) * 1e3:7.1f} ms  "
            f"{nbytes / min(v) / 1e9:5.1f} GB/s  {min(v) / base - 1:+6.1%}  bitwise equal: {same[k]}")


def model_steps(batch: int, n_rounds: int, new: int = 64):
  """Greedy decode steps of the SmolLM2-135M shape (random weights), interleaved: stacked,
  unstacked with kernels [I, O] (the layout before 2026-12-08: x @ W), and unstacked as
  `params.unstack_blocks` builds it (kernels [O, I], the weight on the left)."""
  from valuedist.model import params as P, sampler
  _, cfg, params = common.build("smollm2-135m")
  stacked = jax.block_until_ready(P.with_layout(params, "stacked"))
  n = jax.tree.leaves(stacked["blocks"])[0].shape[0]
  plain = jax.block_until_ready({**stacked, "blocks": tuple(jax.tree.map(lambda a: a[i], stacked["blocks"])
                                                           for i in range(n))})
  left_params = jax.block_until_ready(P.with_layout(params, "unstacked"))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, 32)), jnp.int32)
  mask = jnp.ones_like(tokens)
  run = lambda p, n: sampler.generate(p, tokens, mask, cfg, max_new_tokens=n).tokens.block_until_ready()
  variants = {"stacked": stacked, "unstacked, x @ W": plain, "unstacked, weight left": left_params}
  out = {k: np.asarray(run(p, new)) for k, p in variants.items()}
  for p in variants.values():
    run(p, 1)
  steps = {k: [] for k in variants}
  for _ in range(n_rounds):
    for k, p in variants.items():
      t0 = time.perf_counter()
      run(p, new)
      t1 = time.perf_counter()
      run(p, 1)
      steps[k].append((t1 - t0 - (time.perf_counter() - t1)) / (new - 1))
  for k, v in steps.items():
    print(f"decode step B = {batch}, {k:24s} median {np.median(v) * 1e3:6.1f} ms  "
          f"(rounds {min(v) * 1e3:.1f}-{max(v) * 1e3:.1f})  tokens equal to stacked: {np.array_equal(out[k], out['stacked'])}")


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32, 128, 256])
  ap.add_argument("--rounds", type=int, default=7)
  ap.add_argument("--model", action="store_true")
  ap.add_argument("--batch", type=int, default=8)
  a = ap.parse_args()
  print(common.header("smollm2-135m MLP chain"))
  chain(a.rows, a.rounds)
  if a.model:
    model_steps(a.batch, a.rounds)


if __name__ == "__main__":
  main()
