"""Shipped data: sizes, formats, loaders and their one-line errors, tfds builders."""
import collections
import importlib.util
import json
import sys

import pytest

from valuedist import data
from valuedist.data import builders

SCHWARTZ = ("self_direction", "stimulation", "hedonism", "achievement", "power", "security", "tradition",
            "conformity", "benevolence", "universalism")
HHH = ("harmless", "honest", "helpful")


def _err(fn, *args) -> str:
  """The ValueError message of fn(*args), checked to be one line."""
  with pytest.raises(ValueError) as e:
    fn(*args)
  msg = str(e.value)
  assert msg and "\n" not in msg, msg
  return msg


# ----------------------------------------------------------------------------- shipped data

def test_lexicon_names():
  assert set(data.lexicon_names()) == set(SCHWARTZ) | set(HHH)


@pytest.mark.parametrize("name", HHH + SCHWARTZ)
def test_shipped_lexicon_sizes_and_disjoint(name):
  lex = data.load_lexicon(name)
  assert lex.name == name
  need = 40 if name in HHH else 20
  assert len(lex.positive) >= need and len(lex.negative) >= need
  assert not {w.lower() for w in lex.positive} & {w.lower() for w in lex.negative}
  text = (data.LEXICON_DIR / f"{name}.tsv").read_text()
  assert text.startswith(f"# {name}:")                                  # header says what it measures
  words = [l.split("\t")[1] for l in text.splitlines() if l and not l.startswith("#")]
  assert len(words) == len(set(words)), "duplicate lines"
  assert all(w.isalpha() and w.islower() for w in words)


def test_shipped_prompts():
  prompts = data.load_prompts()
  counts = collections.Counter(p["category"] for p in prompts)
  assert len(prompts) >= 300 and set(counts) == set(data.CATEGORIES)
  assert counts["harmful"] >= 90 and counts["honesty"] >= 70 and counts["dilemma"] >= 80 and counts["neutral"] >= 60
  dilemmas = collections.Counter(p["value"] for p in prompts if p["category"] == "dilemma")
  assert set(dilemmas) == set(SCHWARTZ) and min(dilemmas.values()) >= 8
  names = set(data.lexicon_names())
  assert all(p["value"] is None or p["value"] in names for p in prompts)
  assert len({p["prompt"] for p in prompts}) == len(prompts)
  lengths = [len(p["prompt"].split()) for p in prompts]
  assert min(lengths) <= 4 and max(lengths) >= 30                       # varied length
  raw = [json.loads(l) for l in data.PROMPTS_FILE.read_text().splitlines()]
  assert [set(r) for r in raw] == [{"id", "category", "value", "prompt"}] * len(raw)


def test_shipped_refusal_labels():
  rows = data.load_refusal_labels()
  counts = collections.Counter(r["label"] for r in rows)
  assert len(rows) >= 200 and set(counts) == set(data.LABELS)
  assert abs(counts["refusal"] - counts["compliance"]) <= 0.1 * len(rows)
  assert len({r["text"] for r in rows}) == len(rows)


# ----------------------------------------------------------------------------- lexicon errors

def test_user_lexicon(tmp_path):
  p = tmp_path / "mine.tsv"
  p.write_text("# my lexicon\n\npositive\tgood\r\npositive\tgood\nnegative\tbad\n")
  assert data.load_lexicon(p) == data.Lexicon("mine", ("good",), ("bad",))
  assert data.load_lexicon(str(p)).name == "mine"


def test_lexicon_errors(tmp_path):
  msg = _err(data.load_lexicon, "nope")
  assert "unknown lexicon 'nope'" in msg and "harmless" in msg and "universalism" in msg
  assert "does not exist" in _err(data.load_lexicon, str(tmp_path / "missing.tsv"))
  p = tmp_path / "x.tsv"
  p.write_text("positive\tgood\n")
  assert "no negative words" in _err(data.load_lexicon, p)
  p.write_text("# only a comment\n")
  assert "no positive words" in _err(data.load_lexicon, p)
  p.write_text("positive\tgood\nnegative\tbad\nnegative\tGood\n")
  msg = _err(data.load_lexicon, p)
  assert "x.tsv:3" in msg and "positive" in msg and "line 1" in msg
  p.write_text("positive\tgood\nneutral\tmeh\n")
  assert "x.tsv:2: malformed line" in _err(data.load_lexicon, p)
  p.write_text("positive\tgood\nnegative good\n")
  assert "x.tsv:2: malformed line" in _err(data.load_lexicon, p)
  p.write_text("positive\tgood\nnegative\t\n")
  assert "x.tsv:2" in _err(data.load_lexicon, p)
  p.write_text("positive\tvery good\nnegative\tbad\n")
  assert "x.tsv:1" in _err(data.load_lexicon, p) and "single word" in _err(data.load_lexicon, p)
  p.write_bytes(b"positive\t\xff\n")
  assert "UTF-8" in _err(data.load_lexicon, p)


# ----------------------------------------------------------------------------- prompt files

def test_user_prompt_files(tmp_path):
  j = tmp_path / "p.jsonl"
  j.write_text('{"prompt": "hi"}\n\n{"id": "b", "prompt": " there ", "category": "neutral", "value": null}\n')
  assert data.load_prompts(j) == [
      {"id": "p0001", "category": None, "value": None, "prompt": "hi"},
      {"id": "b", "category": "neutral", "value": None, "prompt": "there"}]
  c = tmp_path / "p.csv"
  c.write_text('id,category,prompt\na,,hello\nb,harmful,"world, with a comma"\n')
  assert data.load_prompts(str(c)) == [
      {"id": "a", "category": None, "value": None, "prompt": "hello"},
      {"id": "b", "category": "harmful", "value": None, "prompt": "world, with a comma"}]
  c.write_text("prompt\nonly prompts\n")
  assert data.load_prompts(c)[0]["id"] == "p0001"


@pytest.mark.parametrize("name,text,expect", [
    ("p.jsonl", '{"prompt": "ok"}\n{broken\n', "p.jsonl:2: malformed line"),
    ("p.jsonl", '{"prompt": "ok"}\n["a list"]\n', "p.jsonl:2: malformed line"),
    ("p.jsonl", "", "no prompts"),
    ("p.jsonl", "\n  \n", "no prompts"),
    ("p.jsonl", '{"prompt": "ok"}\n\n{"text": "no prompt key"}\n', "p.jsonl:3: no 'prompt'"),
    ("p.jsonl", '{"prompt": 7}\n', "p.jsonl:1: no 'prompt'"),
    ("p.jsonl", '{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n', "p.jsonl:2: duplicate id 'a'"),
    ("p.csv", "", "no prompts"),
    ("p.csv", "id,prompt\n", "no prompts"),
    ("p.csv", "id,text\na,hello\n", "p.csv:1: the header has no 'prompt' column"),
    ("p.csv", "id,prompt\na,hello\nb,too,many\n", "p.csv:3: malformed line"),
    ("p.csv", "id,prompt\na,hello\nb,\n", "p.csv:3: no 'prompt'"),
])
def test_prompt_file_errors(tmp_path, name, text, expect):
  p = tmp_path / name
  p.write_text(text)
  assert expect in _err(data.load_prompts, p)


def test_missing_prompt_file(tmp_path):
  assert "does not exist" in _err(data.load_prompts, tmp_path / "nope.jsonl")
  assert "does not exist" in _err(data.load_prompts, tmp_path)


def test_refusal_label_errors(tmp_path):
  p = tmp_path / "l.jsonl"
  p.write_text('{"text": "No.", "label": "refusal"}\n{"text": "Sure.", "label": "maybe"}\n')
  assert "l.jsonl:2: label 'maybe'" in _err(data.load_refusal_labels, p)
  p.write_text('{"label": "refusal"}\n')
  assert "l.jsonl:1: no 'text'" in _err(data.load_refusal_labels, p)
  p.write_text("")
  assert "no labelled responses" in _err(data.load_refusal_labels, p)


# ----------------------------------------------------------------------------- tfds builders

def test_prompts_data_source_serves_every_prompt_in_order(tmp_path):
  source = builders.prompts_data_source(tmp_path)
  prompts = data.load_prompts()
  assert len(source) == len(prompts)
  got = [{k: v.decode() or None for k, v in source[i].items()} for i in range(len(source))]
  assert got == prompts
  assert list((tmp_path / "value_prompts" / "1.0.0").glob("*.array_record*"))
  assert len(builders.prompts_data_source(tmp_path)) == len(prompts)    # second call reuses the copy


def test_refusal_labels_data_source(tmp_path):
  source = builders.data_source(builders.RefusalLabels, tmp_path)
  assert [source[i]["label"].decode() for i in range(len(source))] == [r["label"] for r in data.load_refusal_labels()]


def test_stale_copy_is_rebuilt(tmp_path, monkeypatch):
  assert len(builders.prompts_data_source(tmp_path)) == len(data.load_prompts())
  monkeypatch.setattr(builders.ValuePrompts, "fingerprint", classmethod(lambda cls: "changed"))
  monkeypatch.setattr(builders.ValuePrompts, "rows", classmethod(lambda cls: data.load_prompts()[:3]))
  assert len(builders.prompts_data_source(tmp_path)) == 3


def test_builder_needs_no_tensorflow(tmp_path):
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed here; this test checks the TensorFlow-free path")
  assert len(builders.prompts_data_source(tmp_path)) == len(data.load_prompts())
  assert "tensorflow" not in sys.modules
