"""ConVA-steered generation throughput: valuedist's jitted sampler vs transformers + forward hooks.

Same random-weight model on both sides (default SmolLM2-135M shape, f32), batch 16,
32-token prompts, 64 new tokens, greedy, no EOS (every row generates all of them). The
edit is ConVA's gated minimal activation on a range of layers with one probe per layer:
at the prompt's last token, in layer order with earlier edits active,
eps_l = max(0, (logit(p0) - b_l - w_l.h_l) / |w_l|), and delta_l = eps_l w_l / |w_l| is
added at every prefill position and every decode step.

- valuedist: `sampler.generate(..., intervene=conva.GatedMinimalActivation(...))`, one
  compiled program (the deltas come out of the same prefill that fills the KV cache).
- PyTorch: `model.generate` with a forward hook on each steered decoder layer that computes
  delta_l on the prefill call and adds the stored delta on every call (the usual way to
  steer a transformers model).
Both are also timed unsteered. Measured in the same run first: this machine's matmul peak
and read bandwidth. Prints tokens/s of each, the ratios, valuedist's decode step time steered
and unsteered ((t_new - t_1) / (new - 1)) with the bytes a step reads and its matmul FLOPs per
step time as shares of the read bandwidth and the matmul peak (and the roofline: the most of
each a step can use here), the cost of steering, the largest difference between the two sides'
deltas, and the share of rows whose tokens are identical.

  python -m bench.conva [--batch 16] [--prompt 32] [--new 64] [--layers 10-14] [--p0 0.9]
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from bench import common
from valuedist.model import sampler
from valuedist.values import conva


class TorchConva:
  """ConVA as forward hooks on transformers decoder layers. `reset()` before each generate."""

  def __init__(self, hf, w: np.ndarray, b: np.ndarray, layers: range, p0: float, gate: np.ndarray):
    self.w = torch.from_numpy(w)                                   # [L, D]
    self.b = torch.from_numpy(b)                                   # [L]
    self.s0 = float(np.log(p0 / (1 - p0)))
    self.gate = torch.from_numpy(gate)                             # [B]
    self.deltas: dict[int, torch.Tensor] = {}
    self.handles = [hf.model.layers[l].register_forward_hook(self._hook(l)) for l in layers]

  def reset(self):
    self.deltas = {}

  def _hook(self, layer: int):
    def hook(module, args, out):
      h = out[0] if isinstance(out, tuple) else out                # [B, T, D]
      if layer not in self.deltas:                                 # the prefill call
        w = self.w[layer]
        norm = w.norm()
        score = h[:, -1] @ w + self.b[layer]
        eps = torch.clamp((self.s0 - score) / norm, min=0.0) * self.gate
        self.deltas[layer] = eps[:, None] * (w / norm)
      h = h + self.deltas[layer][:, None, :].to(h.dtype)
      return (h,) + tuple(out[1:]) if isinstance(out, tuple) else h
    return hook

  def remove(self):
    for h in self.handles:
      h.remove()


def main():
  ap = common.arg_parser(batch=16)
  ap.add_argument("--prompt", type=int, default=32)
  ap.add_argument("--new", type=int, default=64)
  ap.add_argument("--layers", default="10-14")
  ap.add_argument("--p0", type=float, default=0.9)
  a = ap.parse_args()
  lim = common.limits()
  hf, cfg, params = common.build(a.arch)
  first, last = conva.parse_layers(a.layers, cfg.n_layers)
  rng = np.random.RandomState(0)
  tokens = rng.randint(3, cfg.vocab_size, (a.batch, a.prompt))
  lengths = rng.randint(a.prompt // 2, a.prompt + 1, a.batch)        # left padding, as in the study
  mask = (np.arange(a.prompt)[None] >= a.prompt - lengths[:, None]).astype(np.int64)
  tokens = np.where(mask > 0, tokens, 0)
  # Random probes that read below p0, so every steered layer of every prompt is edited.
  w = (rng.randn(cfg.n_layers, cfg.d_model) / np.sqrt(cfg.d_model)).astype(np.float32)
  b = np.full(cfg.n_layers, -4.0, np.float32)
  gate = np.ones(a.batch, np.float32)
  edit = conva.GatedMinimalActivation(jnp.asarray(w), jnp.asarray(b), conva.layer_mask(range(first, last + 1), cfg.n_layers),
                                      jnp.asarray(np.log(a.p0 / (1 - a.p0)), jnp.float32), jnp.asarray(gate))
  jt, jm = jnp.asarray(tokens, jnp.int32), jnp.asarray(mask, jnp.int32)

  def ours(intervene, new=a.new):
    return sampler.generate(params, jt, jm, cfg, max_new_tokens=new, intervene=intervene)

  t0 = time.perf_counter()
  jax.block_until_ready(ours(edit))
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(ours(None))

  tt, tm = torch.tensor(tokens), torch.tensor(mask)
  hooks = None

  def theirs():
    if hooks is not None:
      hooks.reset()
    with torch.no_grad():
      return hf.generate(input_ids=tt, attention_mask=tm, max_new_tokens=a.new, min_new_tokens=a.new,
                         do_sample=False, pad_token_id=0)[:, a.prompt:].numpy()

  t_plain_ours = common.timed(lambda: jax.block_until_ready(ours(None)), a.repeats)
  t_plain_torch = common.timed(theirs, a.repeats)
  hooks = TorchConva(hf, w, b, range(first, last + 1), a.p0, gate)
  t_torch = common.timed(theirs, a.repeats)
  t_ours = common.timed(lambda: jax.block_until_ready(ours(edit)), a.repeats)
  # Step times, steered and unsteered alternating round by round (medians), so a drift of
  # the shared machine falls on both alike: (t_new - t_1) / (new - 1).
  steps = {"unsteered": [], "ConVA": []}
  for iv in (None, edit):
    jax.block_until_ready(ours(iv, 1))
  for _ in range(max(a.repeats, 5)):
    for name, iv in (("unsteered", None), ("ConVA", edit)):
      t_new = common.timed(lambda: jax.block_until_ready(ours(iv)), 1, warmups=0)
      t_one = common.timed(lambda: jax.block_until_ready(ours(iv, 1)), 1, warmups=0)
      steps[name].append((t_new - t_one) / (a.new - 1))
  spread = {k: (min(v), max(v)) for k, v in steps.items()}
  steps = {k: float(np.median(v)) for k, v in steps.items()}
  step_bytes = common.decode_bytes(params, cfg, a.batch, a.prompt + a.new / 2)
  step_flops = 2 * common.matmul_params(params, cfg) * a.batch

  g = ours(edit)
  torch_tokens = theirs()
  ours_deltas = np.asarray(g.decode_intervention.vectors)                      # [B, L, D]
  torch_deltas = np.zeros_like(ours_deltas)
  for l, d in hooks.deltas.items():
    torch_deltas[:, l] = d.numpy()
  same_rows = float(np.mean(np.all(np.asarray(g.tokens) == torch_tokens, axis=1)))
  n = a.batch * a.new
  print(common.header(a.arch) + f" batch={a.batch} prompt<={a.prompt} (left padded) new={a.new} "
        f"steered layers={first}-{last} p0={a.p0}")
  print(f"unsteered  transformers.generate  {n / t_plain_torch:8.1f} tokens/s")
  print(f"unsteered  valuedist sampler      {n / t_plain_ours:8.1f} tokens/s   ratio {t_plain_torch / t_plain_ours:.2f}x")
  print(f"ConVA      transformers + hooks   {n / t_torch:8.1f} tokens/s")
  print(f"ConVA      valuedist sampler      {n / t_ours:8.1f} tokens/s   ratio {t_torch / t_ours:.2f}x   "
        f"(first call incl. compile {compile_s:.1f} s)")
  print(common.limits_line(lim) + f"; a decode step reads {step_bytes / 1e6:.0f} MB")
  print(common.roofline_line(step_bytes, step_flops, lim))
  for name, step in steps.items():
    lo, hi = spread[name]
    print(f"valuedist decode step, {name:9s} {step * 1e3:6.1f} ms (rounds {lo * 1e3:.1f}-{hi * 1e3:.1f})  "
          f"{common.shares(step, step_bytes, step_flops, lim)}")
  print(f"cost of steering (valuedist): {t_ours / t_plain_ours - 1:+.1%} wall time, "
        f"{steps['ConVA'] / steps['unsteered'] - 1:+.1%} per decode step (medians of alternating rounds)")
  print(f"max |delta difference| {np.abs(ours_deltas - torch_deltas).max():.2e}   "
        f"mean |delta| {np.linalg.norm(ours_deltas, axis=-1)[:, first:last + 1].mean():.3f}   "
        f"rows with identical tokens {same_rows:.2f}")
  hooks.remove()


if __name__ == "__main__":
  main()
