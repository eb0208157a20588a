"""Row tables: a study's work as rows (condition x prompt, value x kind x coefficient x item, ...)
packed into batches that mix conditions, each row reused from the store on its own.

A row has a key (hashable, unique in its table) that its record answers (`record_key`).
`pending_rows` gives the rows not yet recorded, `table_units` packs them into units for
`engine.stream`, each unit keyed by a fingerprint of its rows, and `row_stream` gives a row its
sampling stream, so an answer depends neither on its batch nor on how the rows were packed.
"""
from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Sequence

from valuedist.model.batching import round_up
from valuedist.parallel import hosts
from valuedist.studies.engine import ResultStore, keyed


@dataclasses.dataclass(frozen=True, eq=False)
class TableUnit:
  """One batch of a row table: `rows` (indices into the table), all of padded length `length`."""
  key: str
  length: int
  rows: tuple


def pending_rows(store: ResultStore, keys: Sequence, record_key: Callable[[dict], Any]) -> list[int]:
  """Indices of a row table's rows whose key (keys [rows], hashable) no record in the store
  carries (`record_key(record)`: the row key a record answers, None for other records), in
  table order: the rows a run still has to compute. Process 0's reading, on every process,
  so all run the same batches. A table is reused row by row: an interrupted, extended or
  re-batched run computes only its missing rows."""
  def todo():
    done = {record_key(r) for r in store.records()}
    return [i for i, k in enumerate(keys) if k not in done]
  return hosts.agree(todo() if hosts.is_writer() else None)


def row_stream(*parts) -> int:
  """A stable id of a table row from its identifying parts ('|'-joined text): its sampling
  stream (`sampler.generate_data_parallel(row_ids=)`), so a sampled answer does not depend on
  the batch the row is in."""
  return int(hashlib.sha256("|".join(map(str, parts)).encode()).hexdigest()[:7], 16)


def table_units(prefix: str, todo: Sequence[int], keys: Sequence, lengths: Sequence[int], groups: Sequence[str],
                batch: int, bucket: int) -> list[TableUnit]:
  """The rows `todo` of a table in batches of at most `batch` rows: grouped by groups[i] (one
  group = rows that may share a batch), then by padded length (lengths[i] rounded up to
  `bucket`), in table order. Keys '<prefix>/<group>/<length>#<fingerprint of the unit's row
  keys>': the same rows give the same key, so when whole units are missing (an interruption)
  the rows left pack into exactly those units again (only a group's last batch is short).
  Units come in the order of their first row, so a resumed run appends them in the order a
  full run writes them. Row keys must be unique (they identify the rows in the store)."""
  if len(set(keys)) != len(keys):
    raise ValueError(f"table {prefix!r}: row keys repeat; give every row a key of its own (they identify its record)")
  by: dict[tuple, list[int]] = {}
  for i in todo:
    by.setdefault((groups[i], round_up(lengths[i], bucket)), []).append(int(i))
  units = [TableUnit(keyed(f"{prefix}/{group}/{length}", [keys[i] for i in rows[j:j + batch]]), length,
                     tuple(rows[j:j + batch]))
           for (group, length), rows in by.items() for j in range(0, len(rows), batch)]
  return sorted(units, key=lambda u: u.rows[0])
