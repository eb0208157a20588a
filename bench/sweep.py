"""A ConVA sweep as one program against the same sweep condition by condition, in one run.

The embedded aligned model (SmolLM2-135M-Instruct, GGUF Q4_1 dequantized to f32), the first
16 shipped prompts through its chat template, K = 8 conditions: each a ConVA edit with its
own probe direction per layer (seeded random unit directions reading below p0, so every
steered layer of every prompt is edited: this measures speed, not steering), its own steered
layers and its own target p0. Greedy, the model's own EOS, `--new` new tokens at most.

- unit by unit (how the studies ran a sweep): K calls of `sampler.generate`, one per
  condition, batch 16 (each call stops when its rows are done).
- one program: the K x 16 rows in one batch, every ConVA field given per row
  (`GatedMinimalActivation` w [B, L, D], b and steer [B, L], s0 [B]), one `generate` call.
Prints tokens/s of both (generated tokens, EOS included, over wall time after compilation;
compile times apart), the ratio, each side's shares of the limits measured in the same run:
of the read bandwidth (bytes its decode steps read: the f32 weights once plus the KV cache up
to the mean position, each step) and of the matmul peak (every matmul FLOP it executes,
prefill included, `common.generate_flops`), both over its wall time; the roofline (how fast
each side could be at these limits, and so the most the one program can gain over the
unit-by-unit time measured); and whether the two give the same tokens for every row.

Both sides run the params in the same `--layout` (stacked blocks under `scan`, or unstacked
per-layer blocks with a per-layer KV cache).

  python -m bench.sweep [--conditions 8] [--prompts 16] [--new 32] [--repeats 3] [--layout stacked]
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from bench import common
from valuedist import checkpoints, data
from valuedist.checkpoints.tokenizer import encode_prompt
from valuedist.model import params as P, sampler
from valuedist.model.batching import pack_left
from valuedist.values import conva


def conditions(cfg, k: int, rng) -> list[dict]:
  """K ConVA conditions: probe w [L, D] (unit rows), b [L], steered-layer mask [L], s0."""
  out = []
  for i in range(k):
    w = rng.standard_normal((cfg.n_layers, cfg.d_model)).astype(np.float32)
    w /= np.linalg.norm(w, axis=-1, keepdims=True)
    first = 4 + 2 * i % (cfg.n_layers - 8)
    steer = np.zeros(cfg.n_layers, np.float32)
    steer[first:first + 4] = 1.0
    p0 = 0.6 + 0.35 * i / max(k - 1, 1)
    out.append(dict(w=w, b=np.full(cfg.n_layers, -4.0, np.float32), steer=steer, s0=np.float32(np.log(p0 / (1 - p0)))))
  return out


def edit(conds: list[dict], rows: int, per_row: bool) -> conva.GatedMinimalActivation:
  """One condition's edit for `rows` prompts, or (per_row) all conditions, each over `rows`."""
  if not per_row:
    c = conds[0]
    return conva.GatedMinimalActivation(jnp.asarray(c["w"]), jnp.asarray(c["b"]), jnp.asarray(c["steer"]),
                                        jnp.asarray(c["s0"]), jnp.ones(rows, jnp.float32))
  stack = lambda name: jnp.asarray(np.repeat(np.stack([c[name] for c in conds]), rows, axis=0))
  return conva.GatedMinimalActivation(stack("w"), stack("b"), stack("steer"), stack("s0"),
                                      jnp.ones(rows * len(conds), jnp.float32))


def main():
  ap = common.arg_parser(batch=16)
  ap.add_argument("--conditions", type=int, default=8)
  ap.add_argument("--prompts", type=int, default=16)
  ap.add_argument("--new", type=int, default=32)
  ap.add_argument("--layout", default="stacked", choices=P.LAYOUTS, help="params layout of both sides")
  a = ap.parse_args()
  m = checkpoints.load("smollm2-135m-instruct")
  cfg, params = m.cfg, jax.block_until_ready(P.with_layout(m.params, a.layout))
  lists = [encode_prompt(m.tokenizer, p["prompt"], chat=True) for p in data.load_prompts()[:a.prompts]]
  length = max(map(len, lists))
  tokens, mask = pack_left(lists, length, a.prompts, m.pad_id)
  conds = conditions(cfg, a.conditions, np.random.default_rng(0))
  eos = jnp.asarray(m.eos_ids, jnp.int32)
  kw = dict(max_new_tokens=a.new, eos_ids=eos, pad_id=m.pad_id)
  small = (jnp.asarray(tokens), jnp.asarray(mask))
  big = (jnp.asarray(np.tile(tokens, (a.conditions, 1))), jnp.asarray(np.tile(mask, (a.conditions, 1))))
  unit_edits = [edit([c], a.prompts, False) for c in conds]
  sweep_edit = edit(conds, a.prompts, True)

  def unit_by_unit():
    return [jax.block_until_ready(sampler.generate(params, *small, cfg, intervene=e, **kw)) for e in unit_edits]

  def one_program():
    return jax.block_until_ready(sampler.generate(params, *big, cfg, intervene=sweep_edit, **kw))

  t0 = time.perf_counter()
  sampler.generate(params, *small, cfg, intervene=unit_edits[0], **kw).tokens.block_until_ready()
  compile_units = time.perf_counter() - t0
  t0 = time.perf_counter()
  one_program()
  compile_sweep = time.perf_counter() - t0
  lim = common.limits()
  t_units = common.timed(unit_by_unit, a.repeats)
  t_sweep = common.timed(one_program, a.repeats)

  units, sweep = unit_by_unit(), one_program()
  unit_tokens = np.concatenate([np.asarray(g.tokens) for g in units])
  unit_lengths = np.concatenate([np.asarray(g.lengths) for g in units])
  same = float(np.mean(np.all(unit_tokens == np.asarray(sweep.tokens), axis=1)))
  generated = int(unit_lengths.sum())
  steps_units = [int(np.asarray(g.lengths).max()) for g in units]
  steps_sweep = int(np.asarray(sweep.lengths).max())
  pos = length + a.new / 2

  def work(calls, batch):
    """(bytes its decode steps read, every matmul FLOP it executes, prefill included) of a side
    whose calls ran `calls` decode steps each on `batch` rows."""
    return (sum(common.decode_bytes(params, cfg, batch, pos) * s for s in calls),
            sum(common.generate_flops(params, cfg, batch, length, s) for s in calls))

  (b_units, f_units), (b_sweep, f_sweep) = work(steps_units, a.prompts), work([steps_sweep], a.conditions * a.prompts)

  rate_u, rate_s = generated / t_units, generated / t_sweep
  print(common.header("smollm2-135m-instruct (embedded, GGUF Q4_1 dequantized to f32)")
        + f" conditions={a.conditions} prompts={a.prompts} prompt<={length} new<={a.new} layout={a.layout}")
  print(common.limits_line(lim))
  print(f"unit by unit ({a.conditions} calls of batch {a.prompts}): {rate_u:.1f} tok/s, {sum(steps_units)} decode steps, "
        f"{common.shares(t_units, b_units, f_units, lim)}; compile {compile_units:.1f} s")
  print(f"one program (batch {a.conditions * a.prompts}): {rate_s:.1f} tok/s, {steps_sweep} decode steps, "
        f"{common.shares(t_sweep, b_sweep, f_sweep, lim)}; compile {compile_sweep:.1f} s")
  # The most one program can gain: its executed FLOPs at the matmul peak, against the time the
  # unit-by-unit side was measured to take (its own floor printed beside it).
  floor_u = common.roofline(b_units, f_units, lim)["floor_s"]
  print(f"roofline: unit by unit executes {f_units / 1e12:.2f} TFLOP and takes >= {floor_u:.1f} s here, one program "
        f"{f_sweep / 1e12:.2f} TFLOP, >= {f_sweep / lim['flops']:.1f} s at the matmul peak: its ratio to the "
        f"unit-by-unit time measured ({t_units:.1f} s) can be at most {t_units / (f_sweep / lim['flops']):.2f}x")
  print(f"ratio one program / unit by unit: {rate_s / rate_u:.2f}x; identical tokens in {100 * same:.0f}% of rows; "
        f"{generated} tokens generated")


if __name__ == "__main__":
  main()
