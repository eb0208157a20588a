"""Running long jobs: prompt encoding, length-bucketed batches, streamed resumable results.

Results stream to `records.jsonl` one batch at a time (flushed and fsynced), keyed by
unit of work, so a killed run loses at most the batch in flight and a rerun skips what
is done. Final artefacts are written atomically (temp file, then rename).
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

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


def progress(units: Sequence[Any], desc: str, done: set[str], key) -> Iterator[Any]:
  """Yields the units not yet done, with a progress bar (rate, ETA) that counts the done ones."""
  todo = [u for u in units if key(u) not in done]
  bar = tqdm(total=len(units), initial=len(units) - len(todo), desc=desc, unit="batch", dynamic_ncols=True)
  for u in todo:
    yield u
    bar.update(1)
  bar.close()
