"""The study engine: units of work, length buckets, the streamed resumable store, progress.

Every study describes its work as units (small frozen dataclasses with a stable `key`) and
runs them through `stream`, the one loop that skips units already in the store, runs the
rest with a progress bar (rate, ETA) and appends each unit's records as a whole (flushed and
fsynced). A killed run loses at most the unit in flight; a rerun skips what is done. Final
artefacts are written atomically (temp file, then rename).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence, TypeVar

import jax
import numpy as np
from tqdm.auto import tqdm

from valuedist.model.batching import round_up
from valuedist.parallel import hosts
from valuedist.parallel.hosts import atomic_write  # noqa: F401  (the studies write files with engine.atomic_write)


class Unit(Protocol):
  """A unit of work: `key` names it in the store (stable across runs of the same config)."""
  key: str


U = TypeVar("U", bound=Unit)


# ----------------------------------------------------------------------------- buckets

@dataclasses.dataclass(frozen=True, eq=False)
class Bucket:
  """One batch of rows of similar length: `rows` [n] indices into the study's token lists,
  `length` the padded length (a multiple of the bucket size), `index` its position in order."""
  index: int
  rows: np.ndarray
  length: int


def buckets(lengths: Sequence[int], batch_size: int, bucket: int = 16) -> list[Bucket]:
  """Groups indices of similar length into batches of at most `batch_size`, padded lengths
  rounded up to `bucket` so few shapes compile. Order is deterministic (by length, then index)."""
  order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
  out = []
  for b, s in enumerate(range(0, len(order), batch_size)):
    idx = np.asarray(order[s:s + batch_size])
    out.append(Bucket(b, idx, round_up(max(lengths[i] for i in idx), bucket)))
  return out


@dataclasses.dataclass(frozen=True, eq=False)
class BatchUnit:
  """The common unit: one bucket of rows under a key '<prefix>/<bucket index>'."""
  key: str
  bucket: Bucket


def batch_units(prefix: str, lengths: Sequence[int], batch_size: int, bucket: int = 16) -> list[BatchUnit]:
  """One `BatchUnit` per length bucket of the rows (see `buckets`)."""
  return [BatchUnit(f"{prefix}/{b.index}", b) for b in buckets(lengths, batch_size, bucket)]


# ----------------------------------------------------------------------------- results

class ResultStore:
  """Append-only JSONL of records, each with a 'unit' key naming the work it came from.
  With several processes every process computes the same records (results are gathered to
  every host), process 0 alone appends them, and the done set is process 0's, broadcast, so
  all processes run the same units (see valuedist.parallel.hosts)."""

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
    """Units with records in the store (process 0's view on every process)."""
    return set(hosts.agree(sorted({r["unit"] for r in self.records()}) if hosts.is_writer() else None))

  def append(self, records: Iterable[dict]) -> None:
    """Appends one unit's records as a whole: a cut-off tail line is dropped first. Only
    process 0 writes."""
    if not hosts.is_writer():
      return
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


# ----------------------------------------------------------------------------- the loop

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


def stream(store: ResultStore, units: Sequence[U], work: Callable[[U], list[dict]], desc: Optional[str]) -> None:
  """The streamed-unit loop of every study: runs `work(unit)` for each unit whose key is not
  yet in the store and appends the records it returns (each carrying `unit=unit.key`). With
  several processes all run the same units (process 0's done set) and meet at a barrier at
  the end, so the store is complete when any of them reads it."""
  for u in progress(units, desc, store.done_units(), key=lambda u: u.key):
    store.append(work(u))
  hosts.barrier(f"stream:{store.path.name}")      # every record appended before any process reads them


# ----------------------------------------------------------------------------- fingerprints

def digest(*parts) -> str:
  """sha256 hex of parts: numpy arrays by dtype, shape and bytes, the rest as sorted-key JSON.
  Deterministic across runs (no ids, paths or times unless a part holds one)."""
  h = hashlib.sha256()
  for p in parts:
    if isinstance(p, (np.ndarray, jax.Array)):
      a = np.ascontiguousarray(np.asarray(p))
      h.update(f"array|{a.dtype}|{a.shape}|".encode())
      h.update(a.reshape(-1).view(np.uint8))
    else:
      h.update(json.dumps(p, sort_keys=True, default=_plain).encode())
    h.update(b"\x00")
  return h.hexdigest()


def _plain(x):
  """JSON form of numpy scalars; anything else unknown is an error (its repr may hold an id)."""
  if isinstance(x, np.generic):
    return x.item()
  raise TypeError(f"cannot fingerprint a {type(x).__name__}; pass plain data or arrays")


def keyed(prefix: str, *parts) -> str:
  """A readable unit-key prefix with a short fingerprint of what the units depend on: '<prefix>#<12 hex>'."""
  return f"{prefix}#{digest(prefix, *parts)[:12]}"
