"""ConVA gated minimal value activation.

For each steered layer l, in order and with earlier layers' edits active, at the prompt's
last token:  s0 = logit(p0),  eps_l = max(0, (s0 - b_l - w_l.h_l) / |w_l|),
delta_l = eps_l * w_l / |w_l|, so the layer's probe then reads exactly p0 (or, in remove
mode, at most p0). `GatedMinimalActivation` decides the deltas during prefill, where it adds
them at every position; its `after_prefill` turns them into a fixed `transformer.AddToResidual`
(per-example vectors [B, L, D]) for every decode step, so `sampler.generate(...,
intervene=edit)` is the whole steered generation in one compiled program. The gate switches
the edit off per prompt.
"""
from __future__ import annotations

import functools
from typing import ClassVar, Sequence

import jax
import numpy as np
import jax.numpy as jnp
from flax import struct

from valuedist.model import transformer
from valuedist.model.config import ModelConfig
from valuedist.parallel import hosts
from valuedist.values import probes


def check_p0(p0: float) -> float:
  if not 0.0 < float(p0) < 1.0:
    raise ValueError(f"p0={p0} is outside (0, 1); choose a target probability such as 0.9")
  return float(p0)


class GatedMinimalActivation(transformer.Intervention):
  """The ConVA edit. In a forward pass (prefill, or scoring a prompt) it computes each
  steered layer's delta from the last position and adds it at every position.

  w: [L, D] probe weights (rows of unsteered layers are ignored); b: [L]; steer: [L] (1 = steer);
  s0: [] target logit; gate: [B] (1 = steer this prompt); remove: [] (1 = push down to p0).
  Every field but gate may also be given per row (w [B, L, D], b and steer [B, L], s0 and
  remove [B]), so prompts of different values, layers and targets share one batch: a whole
  sweep in one program (each row equals its own run with the shared form).
  """
  ROW_FIELDS: ClassVar[dict[str, int]] = {"w": 2, "b": 1, "steer": 1, "s0": 0, "gate": 0, "remove": 0}
  w: jax.Array
  b: jax.Array
  steer: jax.Array
  s0: jax.Array
  gate: jax.Array
  remove: jax.Array = struct.field(default_factory=lambda: jnp.asarray(0.0))

  def edit_sites(self):
    return ("resid_post",)

  def edit(self, site, h, ctx):
    layer = ctx.layer
    last = h[:, -1].astype(jnp.float32)                                       # [B, D]
    w = self.w[..., layer, :].astype(jnp.float32)                             # [D] or [B, D]
    if w.ndim == 1:
      norm = jnp.maximum(jnp.linalg.norm(w), 1e-12)
      score = last @ w + self.b[..., layer]                                   # [B]
    else:
      norm = jnp.maximum(jnp.linalg.norm(w, axis=-1), 1e-12)                  # [B]
      score = jnp.einsum("bd,bd->b", last, w) + self.b[..., layer]
    up = jnp.maximum(0.0, (self.s0 - score) / norm)
    down = -jnp.maximum(0.0, (score - self.s0) / norm)
    eps = jnp.where(self.remove > 0, down, up) * self.steer[..., layer] * self.gate
    unit = w / (norm if w.ndim == 1 else norm[:, None])
    return h + (eps[:, None, None] * (unit if w.ndim == 1 else unit[:, None, :])).astype(h.dtype)

  @property
  def prefill_taps(self):
    return ("resid_post", "resid_post:raw")

  def after_prefill(self, taps) -> transformer.AddToResidual:
    """The fixed per-prompt deltas [B, L, D] (residual minus block output at the last
    position), added at every decode step."""
    return transformer.AddToResidual(jnp.swapaxes(taps["resid_post"] - taps["resid_post:raw"], 0, 1))


@functools.partial(jax.jit, static_argnames="cfg")
def minimal_deltas(params: dict, tokens: jax.Array, mask: jax.Array, edit: GatedMinimalActivation,
                   cfg: ModelConfig) -> jax.Array:
  """The per-prompt edits [B, L, D] (zero rows for unsteered layers or gated-off prompts),
  from one prefill pass of a left-padded batch tokens, mask [B, T] (for analysis; the
  sampler computes the same in its own prefill)."""
  _, _, taps = transformer.forward(params, tokens, cfg, attention_mask=mask, intervene=edit,
                                   taps=edit.prefill_taps, tap_last=True, logits=False)
  return edit.after_prefill(taps).vectors


# ----------------------------------------------------------------------------- identification

@functools.partial(jax.jit, static_argnames="cfg")
def last_token_activations(params: dict, tokens: jax.Array, mask: jax.Array, cfg: ModelConfig) -> jax.Array:
  """Residual stream after every block at the last position of a left-padded batch:
  tokens, mask [B, T] -> f32 [L, B, D]. One forward, no vocabulary projection."""
  _, _, taps = transformer.forward(params, tokens, cfg, attention_mask=mask, taps=("resid_post",), logits=False)
  return taps["resid_post"][:, :, -1].astype(jnp.float32)


class ValueProbes(struct.PyTreeNode):
  """Per value and layer logistic probes. w: [V, L, D]; b, train_acc, val_acc, test_acc: [V, L]
  (accuracy on the train / validation / test scenarios). values: the value keys (static);
  data_hash: SHA-256 of everything they were fitted from."""
  w: jax.Array
  b: jax.Array
  train_acc: jax.Array
  val_acc: jax.Array
  test_acc: jax.Array
  values: tuple = struct.field(pytree_node=False, default=())
  data_hash: str = struct.field(pytree_node=False, default="")

  def index(self, value: str) -> int:
    if value not in self.values:
      raise ValueError(f"no probe for value {value!r}; these probes cover {', '.join(self.values)}")
    return self.values.index(value)


def choose_layers(val_acc, threshold: float = 0.9, exclude_last: int = 5) -> tuple[tuple[int, ...], bool]:
  """The layers ConVA steers, chosen on *validation* accuracy only (the published rule): every
  layer whose probe reaches `threshold`, excluding the last `exclude_last` layers. Returns
  (layers, rule met); when no layer reaches the threshold, the single best allowed layer
  with rule met = False, so the report can flag it."""
  acc = np.asarray(val_acc)
  allowed = np.arange(max(1, len(acc) - exclude_last))
  chosen = tuple(int(l) for l in allowed if acc[l] >= threshold)
  if chosen:
    return chosen, True
  return (int(allowed[np.argmax(acc[allowed])]),), False


def fit_value_probes(acts: jax.Array, y: jax.Array, train: np.ndarray, val: np.ndarray, test: np.ndarray, *,
                     l2: float, max_iter: int = 500) -> tuple:
  """Probes on every layer at once, fitted on the `train` rows: acts [L, N, D], y [N] ->
  (LinearProbe w [L, D], train acc [L], validation acc [L], test acc [L])."""
  acts, y = jnp.asarray(acts), jnp.asarray(y)
  xs, ys = acts[:, train], jnp.broadcast_to(y[train], (acts.shape[0], len(train)))
  probe = probes.fit_logistic_batched(xs, ys, l2=l2, max_iter=max_iter)
  score = jax.vmap(probes.accuracy, in_axes=(0, 0, None))
  return probe, score(probe, xs, y[train]), score(probe, acts[:, val], y[val]), score(probe, acts[:, test], y[test])


def save_value_probes(path, vp: ValueProbes) -> None:
  """Orbax checkpoint of the arrays plus a JSON sidecar with values and data hash."""
  import json
  import orbax.checkpoint as ocp
  from pathlib import Path
  path = Path(path).absolute()
  arrays = {k: np.asarray(getattr(vp, k)) for k in ("w", "b", "train_acc", "val_acc", "test_acc")}
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(path, arrays, force=True)
  hosts.atomic_write(path.parent / (path.name + ".json"), json.dumps({"values": list(vp.values), "data_hash": vp.data_hash}))


def load_value_probes(path) -> ValueProbes:
  """Inverse of `save_value_probes`."""
  import json
  import orbax.checkpoint as ocp
  from pathlib import Path
  path = Path(path).absolute()
  meta_file = path.parent / (path.name + ".json")
  if not meta_file.is_file():
    raise ValueError(f"no value probes at {str(path)!r} (missing {meta_file.name}); fit them first or fix the path")
  meta = json.loads(meta_file.read_text())
  with ocp.StandardCheckpointer() as ckpt:
    arrays = ckpt.restore(path)
  return ValueProbes(**{k: jnp.asarray(v) for k, v in arrays.items()}, values=tuple(meta["values"]),
                     data_hash=meta["data_hash"])


def pairwise_accuracy(w: jax.Array, pos: jax.Array, neg: jax.Array) -> jax.Array:
  """Share of minimal pairs a probe orders correctly, w.h_pos > w.h_neg, whatever its bias:
  w [L, D], pos and neg [L, P, D] (row p of each is one pair) -> [L]."""
  return (jnp.einsum("lpd,ld->lp", jnp.asarray(pos) - jnp.asarray(neg), w) > 0).mean(-1)


def mean_difference(acts: jax.Array, y: jax.Array) -> jax.Array:
  """CAA vectors: mean activation of positive minus negative rows. acts [L, N, D], y [N] -> [L, D]."""
  y = jnp.asarray(y, jnp.float32)
  pos = jnp.einsum("lnd,n->ld", acts, y) / jnp.maximum(y.sum(), 1.0)
  neg = jnp.einsum("lnd,n->ld", acts, 1 - y) / jnp.maximum((1 - y).sum(), 1.0)
  return pos - neg


# ----------------------------------------------------------------------------- steering edits

def parse_layers(spec: str, n_layers: int) -> tuple[int, int]:
  """'a-b' (inclusive) or 'a' -> (a, b), checked against the model's layer count."""
  try:
    parts = [int(x) for x in str(spec).split("-")]
    first, last = (parts[0], parts[-1]) if len(parts) in (1, 2) else (None, None)
  except ValueError:
    first = last = None
  if first is None:
    raise ValueError(f"layer range {spec!r} is malformed; write 'first-last' such as '10-14'")
  if not 0 <= first <= last < n_layers:
    raise ValueError(f"layer range {spec!r} is outside the model's layers 0-{n_layers - 1}; choose layers in it")
  return first, last


def layer_mask(layers: Sequence[int], n_layers: int) -> jax.Array:
  """[L] f32, 1 on the given layers."""
  return jnp.zeros((n_layers,), jnp.float32).at[jnp.asarray(list(layers), jnp.int32)].set(1.0)


def added_deltas(vectors: jax.Array, steer: jax.Array, gate: jax.Array, coef) -> jax.Array:
  """CAA-style fixed edits: vectors [L, D], steer [L], gate [B] -> deltas [B, L, D] = coef * gate * steer * v."""
  return (coef * gate[:, None, None] * steer[None, :, None] * vectors[None]).astype(jnp.float32)
