"""Shipped data: sizes, formats, loaders and their errors, tfds builders."""
import pytest

from valuedist import data
from valuedist.data import builders

SCHWARTZ = ("self_direction", "stimulation", "hedonism", "achievement", "power", "security", "tradition",
            "conformity", "benevolence", "universalism")


def test_shipped_lexicons():
  assert set(data.lexicon_names()) == set(SCHWARTZ) | {"harmless", "honest", "helpful"}
  for name in data.lexicon_names():
    lex = data.load_lexicon(name)
    need = 40 if name in ("harmless", "honest", "helpful") else 20
    assert len(lex.positive) >= need and len(lex.negative) >= need, name
    assert not set(lex.positive) & set(lex.negative)


def test_shipped_prompts_and_labels():
  prompts = data.load_prompts()
  counts = {}
  for p in prompts:
    counts[p["category"]] = counts.get(p["category"], 0) + 1
  assert len(prompts) >= 300
  assert counts["harmful"] >= 90 and counts["honesty"] >= 70 and counts["dilemma"] >= 80 and counts["neutral"] >= 60
  assert {p["value"] for p in prompts if p["category"] == "dilemma"} == set(SCHWARTZ)
  labels = data.load_refusal_labels()
  assert len(labels) >= 200 and {r["label"] for r in labels} == {"refusal", "compliance"}


def _err(fn):
  with pytest.raises(ValueError) as e:
    fn()
  assert "\n" not in str(e.value)
  return str(e.value)


def test_lexicon_errors(tmp_path):
  assert "unknown lexicon" in _err(lambda: data.load_lexicon("nope"))
  p = tmp_path / "x.tsv"
  p.write_text("positive\tgood\n")
  assert "no negative words" in _err(lambda: data.load_lexicon(str(p)))
  p.write_text("positive\tgood\nnegative\tgood\n")
  assert "both sides" in _err(lambda: data.load_lexicon(str(p)))
  p.write_text("positive\tgood\nneutral\tmeh\n")
  assert "x.tsv:2" in _err(lambda: data.load_lexicon(str(p)))


def test_user_prompt_files(tmp_path):
  j = tmp_path / "p.jsonl"
  j.write_text('{"prompt": "hi"}\n{"id": "b", "prompt": "there", "category": "neutral"}\n')
  assert [p["prompt"] for p in data.load_prompts(str(j))] == ["hi", "there"]
  c = tmp_path / "p.csv"
  c.write_text("id,prompt\na,hello\nb,world\n")
  assert [p["id"] for p in data.load_prompts(str(c))] == ["a", "b"]
  j.write_text('{"prompt": "ok"}\n{broken\n')
  assert "p.jsonl:2" in _err(lambda: data.load_prompts(str(j)))
  j.write_text("")
  assert "no prompts" in _err(lambda: data.load_prompts(str(j)))
  j.write_text('{"text": "no prompt key"}\n')
  assert "no 'prompt'" in _err(lambda: data.load_prompts(str(j)))


def test_tfds_builders_serve_everything(tmp_path):
  source = builders.data_source(builders.ValuePrompts, tmp_path)
  assert len(source) == len(data.load_prompts())
  assert {source[i]["id"].decode() for i in range(len(source))} == {p["id"] for p in data.load_prompts()}
  labels = builders.data_source(builders.RefusalLabels, tmp_path)
  assert len(labels) == len(data.load_refusal_labels())
