"""Where a jitted decode step or forward spends its time, op by op.

Traces `--repeats` calls of one decode step (B rows, a KV cache of `--cache` slots whose first
`--filled` hold keys) or of a teacher-forced forward (B x `--prompt` tokens) of the random-weight
model under `jax.profiler.trace`, reads the trace with jaxlib's own XSpace reader, and prints
per call: the wall time, the thread time of every compiled op (summed over XLA's CPU threads, so
the total exceeds the wall time where ops run side by side), grouped by the jax operation each
op came from (an einsum's spec tells the attention's contractions from the projections'), then
the costliest ops with their HLO result shapes. Copies of each layer's slice out of the stacked
weights or cache show up as `dynamic_slice`.

  python -m bench.op_profile [--what decode|forward] [--arch smollm2-135m] [--batch 8]
                          [--cache 96] [--filled 64] [--prompt 256] [--layout stacked] [--top 20]
"""
from __future__ import annotations

import collections
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax._src.lib import _profile_data

from bench import common
from valuedist.model import params as P, transformer

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = (\S+) ([\w-]+)\(")
_WRAPPERS = {"while", "conditional", "call", "async-start", "async-done"}   # their time is their ops'


class Op(NamedTuple):
  name: str        # HLO instruction name
  shape: str       # HLO result type
  source: str      # the jax operation it came from (op_name metadata, jit scopes dropped)
  seconds: float   # thread time per call


def hlo_ops(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (result type, source op)} of a compiled module's text, wrappers left out."""
  ops = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if not m or m.group(3) in _WRAPPERS:
      continue
    src = re.search(r'op_name="([^"]+)"', line)
    parts = [p for p in (src.group(1) if src else m.group(3)).split("/")
             if not p.startswith(("jit(", "while", "body", "closed_call", "cond"))]
    ops[m.group(1)] = (m.group(2), "/".join(parts[-2:]) or m.group(3))
  return ops


def op_times(fn: Callable, make_args: Callable[[], tuple], repeats: int) -> tuple[list[Op], float]:
  """([Op] sorted by time, median wall seconds) of `repeats` calls of jitted `fn`, each on a fresh
  make_args() (so donated buffers may be consumed). Only the compiled program's own instructions
  are counted: runtime wrappers (thunk executors, waits) and while/call bodies' parents are not."""
  ops = hlo_ops(fn.lower(*make_args()).compile().as_text())
  jax.block_until_ready(fn(*make_args()))
  calls = [make_args() for _ in range(repeats)]
  walls = []
  with tempfile.TemporaryDirectory() as d:
    with jax.profiler.trace(d):
      for args in calls:
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        walls.append(time.perf_counter() - t)
    trace = next(Path(d).rglob("*.xplane.pb"))
    data = _profile_data.ProfileData.from_file(str(trace))
  total = collections.Counter()
  for plane in data.planes:
    for line in plane.lines:
      for ev in line.events:
        if ev.name in ops:
          total[ev.name] += ev.duration_ns * 1e-9 / repeats
  out = [Op(n, *ops[n], s) for n, s in total.items()]
  return sorted(out, key=lambda o: -o.seconds), statistics.median(walls)


def decode_step(params, cfg, batch: int, slots: int, filled: int):
  """(jitted step, make_args) of one greedy decode step over a cache whose first `filled` of
  `slots` hold random keys and values; the cache is donated, as in the sampler's loop."""
  per_layer = P.layout_of(params) == "unstacked"
  empty = transformer.init_cache(cfg, batch, slots, per_layer=per_layer)
  key = jax.random.key(0)
  fill = lambda a: jax.random.normal(key, a.shape, a.dtype)
  k, v = jax.tree.map(fill, empty.k), jax.tree.map(fill, empty.v)
  slot = jnp.arange(slots)[None]
  key_pos = jnp.where(slot < filled, slot, -1).repeat(batch, 0)
  tok = jax.random.randint(key, (batch, 1), 3, cfg.vocab_size)
  pos = jnp.full((batch, 1), filled, jnp.int32)

  def step(params, tok, pos, cache):
    logits, cache, _ = transformer.forward(params, tok, cfg, positions=pos, cache=cache)
    return logits[:, -1].argmax(-1), cache

  copy = lambda t: jax.tree.map(jnp.copy, t)
  make = lambda: (params, tok, pos, copy(transformer.Cache(k, v, key_pos, jnp.int32(filled))))
  return jax.jit(step, donate_argnums=3), make


def teacher_forced(params, cfg, batch: int, length: int):
  """(jitted forward returning the logits, make_args) over random tokens."""
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 3, cfg.vocab_size)
  fwd = lambda params, tokens: transformer.forward(params, tokens, cfg)[0]
  return jax.jit(fwd), lambda: (params, tokens)


def main():
  ap = common.arg_parser(batch=8)
  ap.add_argument("--what", default="decode", choices=("decode", "forward"))
  ap.add_argument("--cache", type=int, default=96, help="decode: cache slots")
  ap.add_argument("--filled", type=int, default=64, help="decode: slots holding keys (the step's position)")
  ap.add_argument("--prompt", type=int, default=256, help="forward: tokens per row")
  ap.add_argument("--layout", default="stacked", choices=P.LAYOUTS)
  ap.add_argument("--top", type=int, default=20)
  a = ap.parse_args()
  if a.what == "decode" and not 0 < a.filled < a.cache:
    raise SystemExit(f"--filled {a.filled} must be in 1..{a.cache - 1} (--cache {a.cache}): the step writes slot --filled")
  _, cfg, params = common.build(a.arch, dtype=a.dtype)
  params = jax.block_until_ready(P.with_layout(params, a.layout))
  fn, make = (decode_step(params, cfg, a.batch, a.cache, a.filled) if a.what == "decode"
              else teacher_forced(params, cfg, a.batch, a.prompt))
  ops, wall = op_times(fn, make, a.repeats)
  busy = sum(o.seconds for o in ops)
  shape = f"B={a.batch} cache {a.cache} filled {a.filled}" if a.what == "decode" else f"{a.batch} x {a.prompt}"
  print(common.header(a.arch) + f" {a.what} {shape} layout={a.layout}")
  print(f"wall {1e3 * wall:.1f} ms per call; op thread time {1e3 * busy:.1f} ms ({len(ops)} ops)")
  groups = collections.defaultdict(lambda: [0.0, 0])
  for o in ops:
    groups[o.source][0] += o.seconds
    groups[o.source][1] += 1
  print(f"\n{'thread ms':>10} {'share':>6} {'ops':>4}  source")
  for src, (s, n) in sorted(groups.items(), key=lambda kv: -kv[1][0])[:a.top]:
    print(f"{1e3 * s:10.2f} {100 * s / busy:5.1f}% {n:4d}  {src}")
  print(f"\n{'thread ms':>10}  op, result, source")
  for o in ops[:a.top]:
    print(f"{1e3 * o.seconds:10.2f}  {o.name}  {o.shape}  {o.source}")


if __name__ == "__main__":
  main()
