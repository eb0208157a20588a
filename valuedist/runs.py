"""Running long jobs: prompt encoding, length-bucketed batches, streamed resumable results.

Results stream to `records.jsonl` one batch at a time (flushed and fsynced), keyed by
unit of work, so a killed run loses at most the batch in flight and a rerun skips what
is done. Final artefacts are written atomically (temp file, then rename).
"""
from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm


# ----------------------------------------------------------------------------- prompts

def encode_prompt(tokenizer, prompt: str, *, chat: bool, system: str | None = None) -> list[int]:
  """Token ids of one prompt: through the tokenizer's chat template when `chat` and it has one,
  else the plain text followed by a newline (base models), with the tokenizer's BOS handling."""
  if chat and getattr(tokenizer, "chat_template", None):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
      ids = ids["input_ids"]
    return list(ids)
  text = (system + "\n\n" if system else "") + prompt + "\n"
  return list(tokenizer(text)["input_ids"])


def check_lengths(token_lists: Sequence[Sequence[int]], ids: Sequence[str], limit: int) -> None:
  """One-line error if any prompt (plus what will be generated) exceeds the model context."""
  for i, toks in zip(ids, token_lists):
    if len(toks) > limit:
      raise ValueError(f"prompt {i!r} has {len(toks)} tokens, over the {limit} the model context leaves "
                       "after generation; shorten it or lower max_new_tokens")


# ----------------------------------------------------------------------------- batches

def bucket_batches(lengths: Sequence[int], batch_size: int, bucket: int = 16) -> list[tuple[np.ndarray, int]]:
  """Groups indices of similar length: [(indices, padded_length)], padded lengths rounded up to
  `bucket` so few shapes compile. Order is deterministic (by length, then index)."""
  order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
  out = []
  for s in range(0, len(order), batch_size):
    idx = np.asarray(order[s:s + batch_size])
    t = max(lengths[i] for i in idx)
    out.append((idx, -(-t // bucket) * bucket))
  return out


def pack_left(token_lists: Sequence[Sequence[int]], length: int, batch: int, pad_id: int = 0):
  """Left-padded tokens, mask [batch, length] (rows beyond the lists are all padding)."""
  tokens = np.full((batch, length), pad_id, np.int32)
  mask = np.zeros((batch, length), np.int32)
  for r, toks in enumerate(token_lists):
    if toks:
      tokens[r, length - len(toks):] = toks
      mask[r, length - len(toks):] = 1
  return tokens, mask


def pack_right(token_lists: Sequence[Sequence[int]], length: int, batch: int, pad_id: int = 0):
  """Right-padded tokens, mask [batch, length]."""
  tokens = np.full((batch, length), pad_id, np.int32)
  mask = np.zeros((batch, length), np.int32)
  for r, toks in enumerate(token_lists):
    toks = list(toks)[:length]
    tokens[r, :len(toks)] = toks
    mask[r, :len(toks)] = 1
  return tokens, mask


# ----------------------------------------------------------------------------- results

class ResultStore:
  """Append-only JSONL of records, each with a 'unit' key naming the work it came from."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)

  def records(self) -> list[dict]:
    if not self.path.exists():
      return []
    out = []
    with open(self.path) as f:
      for line in f:
        if not line.endswith("\n"):
          break                       # a line cut off by an interruption: redo its unit
        out.append(json.loads(line))
    return out

  def done_units(self) -> set[str]:
    return {r["unit"] for r in self.records()}

  def append(self, records: Iterable[dict]) -> None:
    """Appends one unit's records as a whole: a cut-off tail line is dropped first."""
    self._drop_partial_tail()
    self.path.parent.mkdir(parents=True, exist_ok=True)
    with open(self.path, "a") as f:
      f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
      f.flush()
      os.fsync(f.fileno())

  def _drop_partial_tail(self) -> None:
    if not self.path.exists():
      return
    data = self.path.read_bytes()
    if data and not data.endswith(b"\n"):
      with open(self.path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name)
  with os.fdopen(fd, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
  os.chmod(tmp, 0o644)            # mkstemp creates 0600; results are meant to be shared
  os.replace(tmp, path)


def save_png(fig, path: str | os.PathLike) -> None:
  """Writes a matplotlib figure as PNG atomically (tight layout) and closes it."""
  import io
  import matplotlib.pyplot as plt
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  atomic_write(path, buf.getvalue())


def progress(units: Sequence[Any], desc: Optional[str], done: set[str] = frozenset(), key=None) -> Iterator[Any]:
  """Yields the units not yet done (key(u) not in done), with a progress bar (rate, ETA)
  that counts the done ones; no bar when desc is None (work nested in a unit of another bar)."""
  todo = [u for u in units if key is None or key(u) not in done]
  if desc is None:
    yield from todo
    return
  bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=desc, unit="batch", dynamic_ncols=True)
  for u in todo:
    yield u
    bar.update(1)
  bar.close()


# ----------------------------------------------------------------------------- loaded models

@dataclasses.dataclass
class Runner:
  """One loaded model (loading.Model) with its anchors, placed on the mesh."""
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
    from valuedist import sharding
    d = self.mesh.shape[sharding.DATA]
    return -(-batch // d) * d

  def batch(self, token_lists, length: int, batch: int, left=True):
    """Packed and data-sharded (tokens, mask) [batch, length]."""
    from valuedist import sharding
    pack = pack_left if left else pack_right
    tokens, mask = pack(token_lists, length, batch, self.model.pad_id)
    return sharding.shard_batch((jnp.asarray(tokens), jnp.asarray(mask)), self.mesh)

  def features(self, texts: Sequence[str], batch: int = 16, layer: Optional[int] = -1, max_tokens: int = 256,
               desc: Optional[str] = "features") -> np.ndarray:
    """Mean-pooled hidden states after block `layer` of plain texts: f32 [N, D] (judge
    features), or [L, N, D] for every block with layer=None."""
    from valuedist import probes
    tok = self.model.tokenizer
    lists = [tok.encode(t, add_special_tokens=False)[:max_tokens] or [self.model.pad_id] for t in texts]
    lead = (self.cfg.n_layers,) if layer is None else ()
    feats = np.zeros(lead + (len(texts), self.cfg.d_model), np.float32)
    for idx, length in progress(bucket_batches([len(l) for l in lists], batch), desc and f"{desc} ({self.role})"):
      tokens, mask = pack_left([lists[i] for i in idx], length, batch, self.model.pad_id)
      f = probes.pool_hidden(self.model.params, self.cfg, jnp.asarray(tokens), jnp.asarray(mask), layer=layer)
      feats[..., idx, :] = np.asarray(f)[..., :len(idx), :]
    return feats


  def option_logits(self, token_lists, option_ids, batch: int = 16, bucket: int = 16, intervene=None,
                    desc: Optional[str] = "option logits") -> np.ndarray:
    """Next-token logits of K options after each prompt (token lists, left padded in length
    buckets, data-sharded): f32 [N, K]; see `evaluation.option_logits`."""
    from valuedist import evaluation
    batch = self.round_batch(batch)
    out = np.zeros((len(token_lists), len(option_ids)), np.float32)
    for idx, length in progress(bucket_batches([len(l) for l in token_lists], batch, bucket), desc and f"{desc} ({self.role})"):
      tokens, mask = self.batch([token_lists[i] for i in idx], length, batch)
      z = evaluation.option_logits(self.model.params, self.cfg, tokens, mask, option_ids, intervene)
      out[idx] = np.asarray(z)[:len(idx)]
    return out


def load_runner(role: str, spec: str, c, lexicons, mesh) -> Runner:
  """Loads model `spec` (dtype, cache_dir from config c) and builds its anchors for `lexicons` (none if empty)."""
  from valuedist import loading
  from valuedist.anchors import build_anchors
  m = loading.load(spec, dtype=jnp.dtype(c.dtype), cache_dir=c.cache_dir or None, mesh=mesh)
  anchors, coverage = build_anchors(m.tokenizer, lexicons) if lexicons else (None, {})
  return Runner(role, m, anchors, coverage, mesh)


def generate_batch(r: Runner, tokens, mask, c, *, seed: int, intervene=None, observe=None, observe_aux=None,
                   score: bool = True):
  """Answers one packed batch with the sampler knobs of config c (max_new_tokens, sample,
  temperature, top_k, top_p) and, with `score`, scores them by perplexity under the
  *unsteered* model given the same prompt. Returns (Generation, tokens [B, N] np,
  lengths [B] np, perplexity [B] np or None)."""
  from valuedist import evaluation, sampler
  g = sampler.generate(r.model.params, tokens, mask, r.cfg, max_new_tokens=c.max_new_tokens,
                       eos_ids=jnp.asarray(r.model.eos_ids, jnp.int32), pad_id=r.model.pad_id,
                       key=jax.random.PRNGKey(seed), sample=c.sample, temperature=c.temperature,
                       top_k=c.top_k, top_p=c.top_p, intervene=intervene, observe=observe, observe_aux=observe_aux)
  out, lengths = np.asarray(g.tokens), np.asarray(g.lengths)
  if not score:
    return g, out, lengths, None
  response_mask = (np.arange(out.shape[1])[None] < lengths[:, None]).astype(np.int32)
  ppl = evaluation.perplexity(r.model.params, r.cfg, tokens, mask, jnp.asarray(np.where(out < 0, 0, out)),
                              jnp.asarray(response_mask))
  return g, out, lengths, np.asarray(ppl)
