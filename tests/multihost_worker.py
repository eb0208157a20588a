"""One process of a multi-process test run (started by launch.local_cluster): loads a tiny
model directory onto the global mesh, runs forward and greedy/sampled generation on fixed
batches, digests the params (engine.digest, chunked), and (process 0) saves the host results. Usage:
python -m tests.multihost_worker MODEL_DIR OUT.npz [--model=M] [--layout=L] --coordinator=... --num_processes=N --process_id=i"""
import argparse
import sys

import numpy as np


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("model_dir")
  ap.add_argument("out")
  ap.add_argument("--model", type=int, default=1)
  ap.add_argument("--layout", default="stacked")
  ap.add_argument("--coordinator", default="")
  ap.add_argument("--num_processes", type=int, default=0)
  ap.add_argument("--process_id", type=int, default=-1)
  a = ap.parse_args()
  from valuedist.parallel import hosts
  hosts.initialize(a.coordinator, a.num_processes, a.process_id)
  import jax
  jax.config.update("jax_default_matmul_precision", "highest")
  out = run(a.model_dir, a.model, layout=a.layout)
  if hosts.is_writer():
    np.savez(a.out, **out)
  hosts.barrier("worker done")


def batch(n: int = 8, length: int = 12, seed: int = 0):
  """Fixed left-padded token batch [n, length] with rows of different lengths."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, 250, (n, length)).astype(np.int32)
  mask = np.ones((n, length), np.int32)
  for i in range(n):
    mask[i, :i % 5] = 0
  return np.where(mask == 1, tokens, 256).astype(np.int32), mask


def run(model_dir: str, model_axis: int = 1, data_axis=None, layout: str = "stacked") -> dict:
  """forward logits [B, T, V], greedy and sampled tokens [B, N] of the fixed batch on a mesh
  of every device (or data_axis x model_axis), params in `layout` (model.params.LAYOUTS)."""
  import jax
  from valuedist import checkpoints
  from valuedist.model import sampler, transformer
  from valuedist.parallel import hosts, sharding
  mesh = sharding.make_mesh(data_axis, model_axis)
  m = checkpoints.load(model_dir, mesh=mesh, layout=layout)
  tokens, mask = sharding.shard_batch(batch(), mesh)
  logits, _, _ = jax.jit(lambda p, t, k: transformer.forward(p, t, m.cfg, attention_mask=k))(m.params, tokens, mask)
  greedy = sampler.generate(m.params, tokens, mask, m.cfg, max_new_tokens=6, pad_id=m.pad_id)
  sampled = sampler.generate(m.params, tokens, mask, m.cfg, max_new_tokens=6, pad_id=m.pad_id,
                             key=jax.random.PRNGKey(3), sample=True, temperature=1.0, top_k=20)
  from valuedist.studies import engine
  fingerprint = engine.digest(*jax.tree.leaves(sharding.unpad_vocab(m.params, m.cfg.vocab_size)))   # chunked on 2 processes
  z = hosts.to_host(logits)
  assert (z[..., m.cfg.vocab_size:] == transformer.PADDED_LOGIT).all()       # the padding a model axis adds
  assert hosts.agree(fingerprint) == fingerprint, "processes disagree on the params' digest"
  return {"logits": z[..., :m.cfg.vocab_size], "greedy": hosts.to_host(greedy.tokens),
          "sampled": hosts.to_host(sampled.tokens), "devices": np.asarray(jax.device_count()),
          "fingerprint": np.asarray(fingerprint)}


if __name__ == "__main__":
  sys.exit(main())
