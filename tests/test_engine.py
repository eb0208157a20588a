"""The study engine: buckets, units, the one streamed-unit loop, atomic report files; config
paths honoured where the studies read data."""
import json

import numpy as np
import pytest

from configs import causal as causal_config, conva as conva_config
from valuedist import data
from valuedist.model.batching import round_up
from valuedist.studies import engine, report, tables
from valuedist.studies.causal import inputs as causal_inputs, sae as causal_sae
from valuedist.studies.conva import detect as conva_detect, inputs as conva_inputs


def test_round_up():
  assert [round_up(x, 8) for x in (1, 8, 9, 16, 17)] == [8, 8, 16, 16, 24]


def test_buckets_sort_by_length_and_round_lengths():
  lengths = [5, 17, 3, 16, 40, 3]
  bs = engine.buckets(lengths, batch_size=2, bucket=16)
  assert [b.index for b in bs] == [0, 1, 2]
  assert [b.rows.tolist() for b in bs] == [[2, 5], [0, 3], [1, 4]]       # by length, then index
  assert [b.length for b in bs] == [16, 16, 48]
  assert all(b.length >= max(lengths[i] for i in b.rows) and b.length % 16 == 0 for b in bs)
  units = engine.batch_units("free/aligned/none", lengths, 2, 16)
  assert [u.key for u in units] == ["free/aligned/none/0", "free/aligned/none/1", "free/aligned/none/2"]


def test_stream_runs_each_unit_once_and_resumes(tmp_path):
  store = engine.ResultStore(tmp_path / "records.jsonl")
  units = engine.batch_units("t", [1, 2, 3, 4, 5], 2, 1)
  calls = []

  def work(u):
    calls.append(u.key)
    if u.key == "t/2" and len(calls) == 3:
      raise KeyboardInterrupt                     # interrupted in the third unit
    return [dict(_row=k, unit=u.key, row=int(i)) for k, i in enumerate(u.bucket.rows)]

  with pytest.raises(KeyboardInterrupt):
    engine.stream(store, units, work, None)
  assert store.done_units() == {"t/0", "t/1"}
  with open(store.path, "a") as f:
    f.write('{"unit": "t/2", "row"')             # a line cut off by the interruption
  engine.stream(store, units, work, None)
  assert calls == ["t/0", "t/1", "t/2", "t/2"]
  assert [r["row"] for r in store.records()] == [0, 1, 2, 3, 4]
  engine.stream(store, units, work, "again")      # all done: nothing runs
  assert len(calls) == 4
  assert all(line.endswith("\n") for line in store.path.read_text().splitlines(keepends=True))
  assert all("_row" not in r for r in store.records())          # the batch row is not stored
  with pytest.raises(ValueError, match="_row"):
    engine.stream(engine.ResultStore(tmp_path / "other.jsonl"), units, lambda u: [dict(unit=u.key)], None)


class _Processes:
  """Simulates process i of n for the store (its file, its writes, process 0's agreement)."""

  def __init__(self, monkeypatch, n):
    self.n, self.i = n, 0
    monkeypatch.setattr(engine.hosts, "multi_process", lambda: True)
    monkeypatch.setattr(engine.hosts, "is_writer", lambda: self.i == 0)
    monkeypatch.setattr(engine.hosts, "agree", lambda v: v)
    monkeypatch.setattr(engine.hosts, "barrier", lambda name: None)
    monkeypatch.setattr(engine.jax, "process_index", lambda: self.i)
    monkeypatch.setattr(engine.jax, "process_count", lambda: self.n)


def test_per_process_files_merge_into_one_process_order(tmp_path, monkeypatch):
  """Two processes each append their own rows of a unit (rows interleaved, as a mesh may
  deal them); the unit is done only once both files end it, `records()` returns it in batch
  row order as one process writes it, a unit one process did not finish is redone by both
  (its earlier run dropped), and a cut tail is dropped by its own process before a stream."""
  one = engine.ResultStore(tmp_path / "one" / "records.jsonl")
  for key, rows in (("u/0", [0, 1, 2, 3]), ("u/1", [0, 1])):
    one.append(key, [dict(_row=r, unit=key, x=r * 10) for r in rows])
  p = _Processes(monkeypatch, 2)
  store = engine.ResultStore(tmp_path / "two" / "records.jsonl")
  own_rows = {0: [0, 2], 1: [1, 3]}

  def write(i, key, rows):
    p.i = i
    store.append(key, [dict(_row=r, unit=key, x=r * 10) for r in rows if r in own_rows[i]])

  def done():
    p.i = 0                                                # process 0 reads, and its reading is agreed
    return store.done_units()

  write(0, "u/0", [0, 1, 2, 3])
  assert done() == set()                       # process 1 has not ended it
  write(1, "u/0", [0, 1, 2, 3])
  write(1, "u/1", [0, 1])                                  # process 0 missed this one
  assert done() == {"u/0"}
  write(0, "u/1", [0, 1])
  write(1, "u/1", [0, 1])                                  # the rerun: process 1 ends u/1 twice
  assert sorted(q.name for q in store.path.parent.iterdir()) == ["records.0-of-2.jsonl", "records.1-of-2.jsonl"]
  assert store.records() == one.records()
  p.i = 1
  with open(store.own_path(), "a") as f:
    f.write('{"_row": 0, "unit": "u/2", "x": 0}\n{"unit": "u/2", "x"')   # an interrupted unit
  store.prepare()
  assert store.own_path().read_text().endswith('"_unit_done": "u/1", "rows": [1]}\n')
  assert store.records() == one.records() and done() == {"u/0", "u/1"}
  p.n, p.i = 1, 0                                          # one process reads (and resumes) it too
  monkeypatch.setattr(engine.hosts, "multi_process", lambda: False)
  assert store.records() == one.records()


def test_in_key_order_ignores_store_order_and_unit_names():
  rng = np.random.default_rng(0)
  recs = [dict(phase=ph, condition=c, id=f"p{i}", score=float(rng.normal()), unit=f"u{rng.integers(9)}", _row=int(i))
          for ph in ("free", "edit") for c in ("b", "a") for i in range(5)]
  recs.append(dict(recs[0], score=-1.0))                      # same key, other content: ordered by content
  want = engine.in_key_order(recs, ("phase", "condition", "id"))
  assert [(r["phase"], r["condition"]) for r in want[:2]] == [("edit", "a")] * 2
  for perm in (rng.permutation(len(recs)) for _ in range(3)):
    moved = [dict(recs[i], unit="other", _row=0) for i in perm]
    got = engine.in_key_order(moved, ("phase", "condition", "id"))
    assert [{k: v for k, v in r.items() if k not in ("unit", "_row")} for r in got] == \
        [{k: v for k, v in r.items() if k not in ("unit", "_row")} for r in want]


def test_report_files_are_written_whole(tmp_path):
  fig, ax = report.figure(figsize=(3, 2))
  ax.plot([0, 1], [1, 0])
  report.save_png(fig, tmp_path / "p.png")
  assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  report.write_csv(tmp_path / "t.csv", ["a", "b"], [[1, "x,y"], [2, [0.1, 0.2]]])
  assert (tmp_path / "t.csv").read_text().splitlines() == ["a,b", '1,"x,y"', '2,"[0.1, 0.2]"']
  assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []     # no temp files left


def _prompt_file(tmp_path, rows):
  path = tmp_path / "prompts.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def test_causal_corpus_reads_the_configured_prompt_file(tmp_path):
  c = causal_config.get_config()
  c.max_roles = 12
  shipped = causal_sae.corpus(causal_inputs.resolve_inputs(c))
  c.prompts = _prompt_file(tmp_path, [{"id": "p1", "prompt": "Only this prompt.", "category": "neutral"}])
  mine = causal_sae.corpus(causal_inputs.resolve_inputs(c))
  assert "Only this prompt." in mine and len(shipped) - len(mine) == len(data.load_prompts()) - 1


def test_conva_gate_reads_the_configured_prompt_file(tmp_path):
  c = conva_config.get_config()
  c.target_values = "power"
  rows = [{"id": "d1", "prompt": "Should I take charge of the team?", "category": "dilemma", "value": "power"},
          {"id": "n1", "prompt": "What is the boiling point of water?", "category": "neutral"}]
  c.prompts = _prompt_file(tmp_path, rows)
  texts, value, group = conva_detect._gate_questions(conva_inputs.resolve_inputs(c))
  assert "Should I take charge of the team?" in texts and "What is the boiling point of water?" in texts
  assert value[texts.index("Should I take charge of the team?")] == "power" and "d1" in group
  shipped = [p["prompt"] for p in data.load_prompts()]
  assert not (set(shipped) - {r["prompt"] for r in rows}) & set(texts)      # no shipped prompt read


def test_check_resume_compares_the_record_keys_of_the_stored_config(tmp_path):
  """engine.check_resume: no records, or the same config, or only free keys changed: passes;
  a changed key (nested ones too) is one line naming old and new; keys one side lacks are not
  compared."""
  import ml_collections
  def cfg(**kw):
    c = ml_collections.ConfigDict(dict(out_dir=str(tmp_path), n=4, bootstrap=100, edit=dict(alpha=0.1), mesh=dict(data=0)))
    for k, v in kw.items():
      setattr(c, k, v) if "." not in k else setattr(c[k.split(".")[0]], k.split(".")[1], v)
    return c
  (tmp_path / "config.json").write_text(cfg().to_json_best_effort())
  engine.check_resume(tmp_path, cfg(n=5))                           # no records yet: anything goes
  engine.ResultStore(tmp_path / "records.jsonl").append("u/0", [dict(_row=0, unit="u/0")])
  engine.check_resume(tmp_path, cfg())
  engine.check_resume(tmp_path, cfg(bootstrap=7, out_dir="elsewhere", **{"mesh.data": 8}), free=("bootstrap",))
  with pytest.raises(ValueError, match=r"another config \(n: 4 -> 5\)"):
    engine.check_resume(tmp_path, cfg(n=5))
  with pytest.raises(ValueError, match=r"edit.alpha: 0.1 -> 0.2; n: 4 -> 6"):
    engine.check_resume(tmp_path, cfg(n=6, **{"edit.alpha": 0.2}))
  with pytest.raises(ValueError, match="bootstrap"):
    engine.check_resume(tmp_path, cfg(bootstrap=7))                 # not free unless the study says so
  newer = cfg()
  newer.added_since = 1
  engine.check_resume(tmp_path, newer)


def test_row_table_units_and_row_by_row_resume(tmp_path):
  """table_units packs each todo row once, by group and padded length, in first-row order; a
  store missing whole units gives exactly those units again (same keys, same order), and
  rows recorded under any batching are not redone; repeated row keys are refused."""
  rng = np.random.RandomState(0)
  n = 40
  keys = [("t", f"c{i % 3}", f"p{i}") for i in range(n)]
  lengths = rng.randint(1, 40, n).tolist()
  groups = [f"c{i % 3}" if i % 5 else "x" for i in range(n)]
  units = tables.table_units("t", range(n), keys, lengths, groups, 4, 16)
  assert sorted(i for u in units for i in u.rows) == list(range(n))
  assert [u.rows[0] for u in units] == sorted(u.rows[0] for u in units) and len({u.key for u in units}) == len(units)
  for u in units:
    assert 0 < len(u.rows) <= 4 and len({groups[i] for i in u.rows}) == 1
    assert {-(-lengths[i] // 16) * 16 for i in u.rows} == {u.length}
  store = engine.ResultStore(tmp_path / "records.jsonl")
  record_key = lambda r: (r["t"], r["c"], r["p"])
  work = lambda u: [dict(_row=k, unit=u.key, t=keys[i][0], c=keys[i][1], p=keys[i][2]) for k, i in enumerate(u.rows)]
  kept = [u for j, u in enumerate(units) if j % 3]                  # every third unit lost
  engine.stream(store, kept, work, None)
  todo = tables.pending_rows(store, keys, record_key)
  assert todo == sorted(i for j, u in enumerate(units) if not j % 3 for i in u.rows)
  again = tables.table_units("t", todo, keys, lengths, groups, 4, 16)
  assert [(u.key, u.rows) for u in again] == [(u.key, u.rows) for j, u in enumerate(units) if not j % 3]
  engine.stream(store, again, work, None)
  assert tables.pending_rows(store, keys, record_key) == []
  other = tables.table_units("t", range(n), keys, lengths, ["all"] * n, 4, 16)   # another batching: nothing left to do
  assert tables.pending_rows(store, [keys[i] for u in other for i in u.rows], record_key) == []
  with pytest.raises(ValueError, match="row keys repeat"):
    tables.table_units("t", range(3), [("a",), ("b",), ("a",)], [1, 2, 3], ["g"] * 3, 4, 16)
