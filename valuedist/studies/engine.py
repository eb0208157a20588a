"""The study engine: units of work, length buckets, the streamed resumable store, progress.

Every study describes its work as units (small frozen dataclasses with a stable `key`) and
runs them through `stream`, the one loop that skips units already in the store, runs the
rest with a progress bar (rate, ETA) and appends each unit's records as a whole (flushed and
fsynced). A killed run loses at most the unit in flight; a rerun skips what is done. Final
artefacts are written atomically (temp file, then rename).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, TypeVar

import jax
import numpy as np
from tqdm.auto import tqdm

from valuedist.model.batching import round_up
from valuedist.parallel import hosts, sharding
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


def on_study_mesh(run_on_mesh: Callable[[Any, jax.sharding.Mesh], Any]) -> Callable[[Any], Any]:
  """A study's `run(c)` from `run_on_mesh(c, mesh)`: builds the mesh of c.mesh (data x model)
  and runs the study under `jax.set_mesh(mesh)`, so the model's own layout constraints (the
  KV cache on data x model, the residual stream on data; `model.partition`) apply in every
  program the study traces."""
  @functools.wraps(run_on_mesh)
  def run(c):
    mesh = sharding.mesh_from_config(c)
    with jax.set_mesh(mesh):
      return run_on_mesh(c, mesh)
  return run


# ----------------------------------------------------------------------------- results

ROW = "_row"              # a record's row in its padded batch: given by per-process work, never stored
UNIT_DONE = "_unit_done"  # the end-of-unit line of a per-process file


class ResultStore:
  """Append-only JSONL records, each with a 'unit' key naming the work it came from.

  One process appends each unit's records to `path` (records.jsonl), as it always has. With
  n processes, process i appends the records of its own rows to `records.{i}-of-{n}.jsonl`,
  each unit's records followed by one end line {UNIT_DONE: key, 'rows': [row in the batch of
  each record]} in the same write; a unit is done when all n files end it, and `records()`
  merges the files back into one-process order (rows sorted within a unit). The done set is
  process 0's reading, broadcast, so every process runs the same units (and the same collective
  programs). A folder written by one process resumes on several and the other way round:
  `records()` reads `path` and every complete set of per-process files beside it."""

  def __init__(self, path: str | os.PathLike):
    self.path = Path(path)

  # -- reading

  def records(self) -> list[dict]:
    """Every record: the lines of `path` in file order, then the units complete in each set
    of per-process files (a file of records without units, such as judge scores, reads too)."""
    own = _complete_lines(self.path)
    seen = {r.get("unit") for r in own}
    return own + [r for key, recs in self._units(own).items() if key not in seen for r in recs]

  def done_units(self) -> set[str]:
    """Units with records in the store (process 0's view on every process)."""
    done = lambda: sorted(k for k in self._units(_complete_lines(self.path)) if k is not None)
    return set(hosts.agree(done() if hosts.is_writer() else None))

  def _units(self, own: list[dict]) -> dict[str, list[dict]]:
    """Every unit's records, in order: those of `own` (the lines of `path`), then those
    complete in each set of per-process files."""
    units: dict[str, list[dict]] = {}
    for r in own:
      units.setdefault(r.get("unit"), []).append(r)
    for n, paths in sorted(self._part_sets().items()):
      if len(paths) < n:
        continue                          # a set with a missing file ends no unit
      ended = [_ended_units(_complete_lines(p)) for p in paths]
      for key in ended[0]:
        if key in units or not all(key in e for e in ended):
          continue
        parts = [e[key] for e in ended]
        if all(rows is not None for rows, _ in parts):
          merged = sorted(((row, i, rec) for i, (rows, recs) in enumerate(parts) for row, rec in zip(rows, recs)),
                          key=lambda x: x[:2])
          units[key] = [rec for _, _, rec in merged]
        else:
          units[key] = [rec for _, recs in parts for rec in recs]
    return units

  def _part_path(self, i: int, n: int) -> Path:
    return self.path.with_name(f"{self.path.stem}.{i}-of-{n}{self.path.suffix}")

  def _part_sets(self) -> dict[int, list[Path]]:
    """{n: the existing files records.{i}-of-{n}.jsonl, by i}."""
    sets: dict[int, dict[int, Path]] = {}
    for p in self.path.parent.glob(f"{self.path.stem}.*-of-*{self.path.suffix}"):
      m = re.fullmatch(rf"{re.escape(self.path.stem)}\.(\d+)-of-(\d+){re.escape(self.path.suffix)}", p.name)
      if m:
        sets.setdefault(int(m[2]), {})[int(m[1])] = p
    return {n: [files[i] for i in range(n) if i in files] for n, files in sets.items()}

  # -- writing

  def own_path(self) -> Path:
    """The file this process appends to: `path` on one process, its per-process file on several."""
    return self._part_path(jax.process_index(), jax.process_count()) if hosts.multi_process() else self.path

  def prepare(self) -> None:
    """Before a stream: drops what an interruption left unfinished at the end of this
    process's file (a cut line; on several processes, records after the last end line), then
    waits for every process."""
    path = self.own_path()
    if path.exists():
      data = path.read_bytes()
      keep = end = 0
      for line in data.splitlines(keepends=True):
        end += len(line)
        if not line.endswith(b"\n"):
          break
        if not hosts.multi_process() or UNIT_DONE in json.loads(line):
          keep = end
      if keep < len(data):
        with open(path, "r+b") as f:
          f.truncate(keep)
    hosts.barrier(f"prepare:{self.path.name}")

  def append(self, key: str, records: Sequence[dict], shared: bool = False) -> None:
    """Appends one unit's records as a whole. Per-process records (the default) carry their
    row in the batch under ROW (stripped before writing); `shared` records are the same on
    every process and only process 0's are kept."""
    if shared and not hosts.is_writer():
      records = []
    if not shared and any(ROW not in r for r in records):
      raise ValueError(f"unit {key}: per-process records need their batch row under {ROW!r} (or shared=True)")
    rows = None if shared else [int(r[ROW]) for r in records]
    lines = [{k: v for k, v in r.items() if k != ROW} for r in records]
    if hosts.multi_process():
      lines.append({UNIT_DONE: key, "rows": rows})
    elif not lines:
      return
    path = self.own_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
      f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in lines))
      f.flush()
      os.fsync(f.fileno())


def in_key_order(records: Sequence[dict], fields: Sequence[str]) -> list[dict]:
  """`records` sorted by what identifies them: the text of each of `fields`, then the rest of
  the record (its 'unit' and '_row' left out). A summary of them then does not depend on the
  order a store holds them in: a resumed, re-batched or multi-process run appends the same
  records in another order, and a bootstrap resamples by position."""
  def key(r: dict) -> tuple:
    rest = json.dumps({k: v for k, v in r.items() if k not in ("unit", "_row")}, sort_keys=True, default=str)
    return tuple(str(r.get(f)) for f in fields) + (rest,)
  return sorted(records, key=key)


def _complete_lines(path: Path) -> list[dict]:
  """The JSON lines of a file, up to a line cut off by an interruption (its unit is redone)."""
  if not path.exists():
    return []
  out = []
  with open(path) as f:
    for line in f:
      if not line.endswith("\n"):
        break
      out.append(json.loads(line))
  return out


def _ended_units(lines: list[dict]) -> dict[str, tuple[Optional[list[int]], list[dict]]]:
  """{unit: (rows, records)} of a per-process file: the records just before each end line;
  a unit ended twice (redone after another process missed it) keeps its last run, and the
  order is that of the last end lines."""
  out: dict[str, tuple] = {}
  pending: list[dict] = []
  for r in lines:
    if UNIT_DONE in r:
      out.pop(r[UNIT_DONE], None)
      out[r[UNIT_DONE]] = (r["rows"], pending)
      pending = []
    else:
      pending.append(r)
  return out


ALWAYS_FREE = ("out_dir", "cache_dir", "mesh.")   # where a run writes and how it is laid out: never in a record


def check_resume(out: Path, c, free: Sequence[str] = ()) -> None:
  """Before a study appends to the records in `out`: refuses to resume records that another
  config wrote. The config.json the last run left there is compared with c on every key both
  have (keys added since are not compared), except ALWAYS_FREE and `free`, the study's keys its
  records do not depend on (a dotted key, or a prefix ending in '.'). For stores whose unit keys
  do not fingerprint what they depend on (the gap study, the ConVA sweep): a resumed unit with
  another model, prompt count or generation setting would silently mix stale records. A folder
  without records is not checked. Raises ValueError, one line, naming the keys and the fix;
  every process raises alike (process 0 reads, `hosts.agree`)."""
  def differences() -> list[str]:
    stored = Path(out) / "config.json"
    if not stored.exists() or not ResultStore(Path(out) / "records.jsonl").records():
      return []
    old, new = _flat(json.loads(stored.read_text())), _flat(json.loads(c.to_json_best_effort()))
    skip = tuple(ALWAYS_FREE) + tuple(free)
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in sorted(old.keys() & new.keys())
            if old[k] != new[k] and not any(k == f or (f.endswith(".") and k.startswith(f)) for f in skip)]
  changed = hosts.agree(differences() if hosts.is_writer() else None)
  if changed:
    raise ValueError(f"{out} holds records of another config ({'; '.join(changed)}): give a new --config.out_dir, "
                     "or delete that folder to start over")


def _flat(d: dict, prefix: str = "") -> dict:
  """A nested config dict as {dotted key: value}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


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


def stream(store: ResultStore, units: Sequence[U], work: Callable[[U], Any], desc: Optional[str],
           shared: bool = False, collect: Optional[Callable[[U, Any], list[dict]]] = None) -> None:
  """The streamed-unit loop of every study: runs `work(unit)` for each unit whose key is not
  yet in the store and appends the records it returns (each carrying `unit=unit.key`).
  `work` returns the records of the rows this process owns (`Runner.mine`), each with its
  batch row under ROW, read from this process's shards; with `shared`, records every process
  computes alike (from gathered values), of which process 0's are kept. All processes run
  the same units (process 0's done set) and meet at a barrier at the end, so the store is
  complete when any of them reads it.

  With `collect`, `work(unit)` only dispatches the unit's program (returns its device arrays
  unread) and `collect(unit, dispatched)` reads them into the records: unit i+1 is dispatched
  before unit i is read, so the devices run the next batch while the host writes this one (an
  interruption then loses at most the two units in flight)."""
  store.prepare()
  pending = None
  for u in progress(units, desc, store.done_units(), key=lambda u: u.key):
    if collect is None:
      store.append(u.key, work(u), shared)
      continue
    dispatched = (u, work(u))
    if pending is not None:
      store.append(pending[0].key, collect(*pending), shared)
    pending = dispatched
  if pending is not None:
    store.append(pending[0].key, collect(*pending), shared)
  hosts.barrier(f"stream:{store.path.name}")      # every record appended before any process reads them


_PROGRAMS: "weakref.WeakSet[Programs]" = weakref.WeakSet()


def clear_programs() -> None:
  """Drops every `Programs` executable (as `jax.clear_caches` does for jitted functions)."""
  for p in _PROGRAMS:
    p.executables.clear()


class Programs:
  """A function compiled ahead of time for each argument signature it meets: `jax.jit(fn)
  .lower(*args).compile()` once per pytree structure, shapes, dtypes and shardings of the
  arguments (and values of the static ones), then the compiled executable is called, so a
  sweep compiles one program per bucket shape and every later bucket of that shape only
  dispatches. `compiled` counts them and `compile_seconds` is their total compile time."""

  def __init__(self, fn: Callable, static_argnames: Sequence[str] = ()):
    self.jitted = jax.jit(fn, static_argnames=tuple(static_argnames))
    self.executables: dict = {}
    self.compile_seconds = 0.0
    _PROGRAMS.add(self)

  @property
  def compiled(self) -> int:
    return len(self.executables)

  def __call__(self, *args, **static):
    leaves, tree = jax.tree.flatten(args)
    key = (tree, tuple(sorted(static.items())),
           tuple((x.shape, str(x.dtype), getattr(x, "sharding", None), getattr(x, "weak_type", False))
                 if hasattr(x, "shape") else type(x) for x in leaves))
    if key not in self.executables:
      t0 = time.perf_counter()
      self.executables[key] = self.jitted.lower(*args, **static).compile()
      self.compile_seconds += time.perf_counter() - t0
    return self.executables[key](*args)


# ----------------------------------------------------------------------------- fingerprints

def digest(*parts) -> str:
  """sha256 hex of parts: numpy and jax arrays by dtype, shape and bytes, the rest as
  sorted-key JSON. Deterministic across runs (no ids, paths or times unless a part holds one).
  A global jax array is read in chunks (`hosts.host_chunks`), so its digest is that of its
  bytes whatever the mesh or process count, and no host holds more than a chunk of it."""
  h = hashlib.sha256()
  for p in parts:
    if isinstance(p, (np.ndarray, jax.Array)):
      h.update(f"array|{np.dtype(p.dtype)}|{tuple(p.shape)}|".encode())
      for chunk in hosts.host_chunks(p):
        h.update(np.ascontiguousarray(chunk).reshape(-1).view(np.uint8))
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
