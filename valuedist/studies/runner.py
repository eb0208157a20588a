"""A loaded model as the studies use it: checkpoint, anchors and mesh, with the batched
readouts every study needs (chat encoding, sharded batches, pooled and last-token features,
option logits, generation scored by perplexity)."""
from __future__ import annotations

import dataclasses
import hashlib
import weakref
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from valuedist import checkpoints
from valuedist.checkpoints.tokenizer import encode_prompt
from valuedist.eval import judges, likelihood
from valuedist.model.batching import pack_left, pack_right, round_up
from valuedist.parallel import hosts, sharding
from valuedist.studies.engine import buckets, digest, progress
from valuedist.values import conva
from valuedist.values.anchor_edit import AnchorEdit
from valuedist.values.anchors import build_anchors


@dataclasses.dataclass
class Runner:
  """One loaded model (checkpoints.Model) with its anchors, placed on the mesh."""
  role: str
  model: Any
  anchors: Any
  coverage: dict
  mesh: Any

  @property
  def cfg(self):
    return self.model.cfg

  def encode(self, prompts: Sequence[dict], system: Optional[str] = None, *, key: str = "prompt") -> list[list[int]]:
    """Chat-formatted token ids of prompt dicts (their `key` text), with an optional system prompt."""
    return [encode_prompt(self.model.tokenizer, p[key], chat=True, system=system) for p in prompts]

  def round_batch(self, batch: int) -> int:
    """`batch` rounded up to a multiple of the mesh's data axis (every device gets rows)."""
    return round_up(batch, self.mesh.shape[sharding.DATA])

  def owned_rows(self, batch: int) -> np.ndarray:
    """Rows of a data-sharded batch of `batch` rows this process reports (all on one process)."""
    return hosts.owned_rows(sharding.batch_sharding(self.mesh, 1), batch)

  def mine(self, idx: Sequence[int], batch: int) -> list[tuple[int, int]]:
    """(row, i) for the bucket rows `idx` (study indices, packed in order into a batch of
    `batch`) that this process reports: records are written per process, of its own rows."""
    return [(int(row), int(idx[row])) for row in self.owned_rows(batch) if row < len(idx)]

  def local(self, tree, axis: int = 0):
    """Every array of a pytree read at this process's own rows of its batch axis `axis`, from
    its own shards (others zero; see hosts.local_value): what per-process records are made of."""
    return jax.tree.map(lambda x: hosts.local_value(x, self.owned_rows(x.shape[axis]), axis), tree)

  def batch(self, token_lists, length: int, batch: int, left=True, pad_id: Optional[int] = None):
    """Packed and data-sharded (tokens, mask) [batch, length]: left padded (prompts) or right
    padded (answers), with the model's pad id unless another is given."""
    pack = pack_left if left else pack_right
    return sharding.shard_batch(pack(token_lists, length, batch, self.model.pad_id if pad_id is None else pad_id),
                                self.mesh)

  def features(self, texts: Sequence[str], batch: int = 16, layer: Optional[int] = -1, max_tokens: int = 256,
               desc: Optional[str] = "features") -> np.ndarray:
    """Mean-pooled hidden states after block `layer` of plain texts, the first token (an
    attention sink) left out: f32 [N, D] (judge features), or [L, N, D] for every block with
    layer=None."""
    tok = self.model.tokenizer
    lists = [tok.encode(t, add_special_tokens=False)[:max_tokens] or [self.model.pad_id] for t in texts]
    lead = (self.cfg.n_layers,) if layer is None else ()
    batch = self.round_batch(batch)
    feats = np.zeros(lead + (len(texts), self.cfg.d_model), np.float32)
    for b in progress(buckets([len(l) for l in lists], batch), desc and f"{desc} ({self.role})"):
      tokens, mask = self.batch([lists[i] for i in b.rows], b.length, batch)
      f = judges.pool_hidden(self.model.params, self.cfg, tokens, mask, layer=layer, skip_first=True)
      feats[..., b.rows, :] = hosts.to_host(f)[..., :len(b.rows), :]
    return feats

  def last_token_activations(self, texts: Sequence[str], batch: int) -> np.ndarray:
    """Last-token residual stream of plain texts (tokenizer's own BOS handling): [L, N, D]."""
    tok = self.model.tokenizer
    return self._last_position_acts([list(tok(t)["input_ids"]) for t in texts], batch)

  def generation_activations(self, texts: Sequence[str], batch: int) -> np.ndarray:
    """Residual stream at the answer position of each text sent as a chat prompt (the
    position where generation, and ConVA's edit, starts): [L, N, D]."""
    return self._last_position_acts(self.encode([{"prompt": t} for t in texts]), batch)

  def _last_position_acts(self, lists: Sequence[Sequence[int]], batch: int) -> np.ndarray:
    batch = self.round_batch(batch)
    out = np.zeros((self.cfg.n_layers, len(lists), self.cfg.d_model), np.float32)
    for b in buckets([len(l) for l in lists], batch):
      tokens, mask = self.batch([lists[i] for i in b.rows], b.length, batch)
      acts = conva.last_token_activations(self.model.params, tokens, mask, self.cfg)
      out[:, b.rows] = hosts.to_host(acts)[:, :len(b.rows)]
    return out

  def option_logits(self, token_lists, option_ids, batch: int = 16, bucket: int = 16, intervene=None,
                    desc: Optional[str] = "option logits") -> np.ndarray:
    """Next-token logits of K options after each prompt (token lists, left padded in length
    buckets, data-sharded): f32 [N, K]; see `likelihood.option_logits`."""
    batch = self.round_batch(batch)
    out = np.zeros((len(token_lists), len(option_ids)), np.float32)
    for b in progress(buckets([len(l) for l in token_lists], batch, bucket), desc and f"{desc} ({self.role})"):
      tokens, mask = self.batch([token_lists[i] for i in b.rows], b.length, batch)
      z = likelihood.option_logits(self.model.params, self.cfg, tokens, mask, option_ids, intervene)
      out[b.rows] = hosts.to_host(z)[:len(b.rows)]
    return out


def load_runner(role: str, spec: str, c, lexicons, mesh) -> Runner:
  """Loads model `spec` (dtype, cache_dir from config c) and builds its anchors for `lexicons`
  (none if empty; multi-token words map to their first piece only with c.anchor_first_pieces)."""
  m = checkpoints.load(spec, dtype=jnp.dtype(c.dtype), cache_dir=c.cache_dir or None, mesh=mesh,
                       layout=c.get("layout", "stacked"))
  anchors, coverage = build_anchors(m.tokenizer, lexicons, c.anchor_first_pieces, m.cfg.vocab_size) if lexicons else (None, {})
  return Runner(role, m, anchors, coverage, mesh)


def check_generation_config(c) -> None:
  """One-line error for generation knobs of config c that cannot run."""
  if c.max_new_tokens < 1 or c.batch_size < 1:
    raise ValueError("max_new_tokens and batch_size must be positive")


def anchor_edit(r: Runner, lexicon: str, e) -> AnchorEdit:
  """The anchor-word edit of r's last hidden state on one of its lexicons, with the knobs of
  config section e (mode, site, objective, alpha, lam, steps, margin, max_scale)."""
  return AnchorEdit.create(r.model.params, r.cfg, r.anchors, lexicon, mode=e.mode, site=e.site, objective=e.objective,
                           alpha=e.alpha, lam=e.lam, steps=e.steps, margin=e.margin, max_scale=e.max_scale)


_MODEL_DIGESTS: dict[int, str] = {}              # id(checkpoints.Model) -> digest, dropped with the model


def model_identity(r: Runner) -> str:
  """sha256 hex of the loaded model: config, special ids and every parameter (path in the
  tree, dtype, shape, bytes); not its spec or file path. Computed once per loaded model; the
  same on one process or several, on any mesh (a vocabulary padded for the model axis is cut
  back first; a multi-host leaf is hashed chunk by chunk as
  it is gathered, `engine.digest`), so caches keyed by it resume across process counts."""
  m = r.model
  if id(m) not in _MODEL_DIGESTS:
    h = hashlib.sha256(digest(dataclasses.asdict(m.cfg), m.bos_id, list(m.eos_ids), m.pad_id).encode())
    for path, leaf in jax.tree_util.tree_leaves_with_path(sharding.unpad_vocab(m.params, m.cfg.vocab_size)):
      h.update(digest(jax.tree_util.keystr(path), leaf).encode())
    _MODEL_DIGESTS[id(m)] = h.hexdigest()
    weakref.finalize(m, _MODEL_DIGESTS.pop, id(m), None)
  return _MODEL_DIGESTS[id(m)]
