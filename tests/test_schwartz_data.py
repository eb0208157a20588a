"""The shipped Schwartz-value data: sizes, minimal-pair structure, loaders' errors, tfds builders."""
import collections
import os

import pytest

from valuedist.data import builders, schwartz


def test_minimal_pairs_differ_only_in_the_choice():
  scenarios = schwartz.load_scenarios()
  for v in schwartz.VALUES:
    pairs = schwartz.value_pairs(v, scenarios=scenarios)
    assert len(pairs) >= 80, v
    assert collections.Counter(p.form for p in pairs).keys() == set(schwartz.FORMS)
    for p in pairs:
      pre = os.path.commonprefix([p.positive, p.negative])
      suf = os.path.commonprefix([p.positive[::-1], p.negative[::-1]])[::-1]
      assert pre.startswith("When ") and suf.endswith((".", "?")), p
      assert pre.count(",") >= 1                         # the whole situation is shared
      assert p.positive != p.negative


def test_uncontrolled_pairs_share_positives_and_use_neutral_negatives():
  ctl = schwartz.value_pairs("power")
  unc = schwartz.value_pairs("power", controlled=False)
  neutral = set(schwartz.load_neutral())
  assert [p.positive for p in unc] == [p.positive for p in ctl]
  assert all(p.negative in neutral for p in unc)


def test_evaluation_sets_sizes():
  dilemmas = collections.Counter(d["value"] for d in schwartz.load_dilemmas())
  assert set(dilemmas) == set(schwartz.VALUES) and min(dilemmas.values()) >= 50
  prefixes = schwartz.load_prefixes()
  assert all(prefixes[v]["opposite"].startswith("You have a low level") for v in schwartz.VALUES)
  answers = schwartz.load_answers()
  per = collections.Counter((a["value"], a["label"]) for a in answers)
  assert set(per) == {(v, l) for v in schwartz.VALUES for l in schwartz.ANSWER_LABELS} and min(per.values()) >= 6
  train = schwartz.load_answers(schwartz.JUDGE_ANSWERS_FILE)      # the judge's own, disjoint training answers
  per = collections.Counter((a["value"], a["label"]) for a in train)
  assert set(per) == {(v, l) for v in schwartz.VALUES for l in schwartz.ANSWER_LABELS} and min(per.values()) >= 12
  assert len({a["id"] for a in train}) == len(train)
  held = {a["question"] for a in answers} | {d["question"] for d in schwartz.load_dilemmas()}
  assert not held & {a["question"] for a in train}
  mc = schwartz.load_general_mc()
  assert len(mc) >= 150 and len({q["id"] for q in mc}) == len(mc)
  assert collections.Counter(q["answer"] for q in mc).keys() == {0, 1, 2, 3}
  assert schwartz.mc_prompt(mc[0]).count("\n") == 5
  items = schwartz.load_questionnaire(min_items=6)
  assert all(i["text"].startswith("This person") for i in items)
  assert len(schwartz.load_roles()) >= 100


def _err(fn, *a, **kw):
  with pytest.raises(ValueError) as e:
    fn(*a, **kw)
  assert "\n" not in str(e.value)
  return str(e.value)


def test_loader_errors(tmp_path):
  p = tmp_path / "s.jsonl"
  p.write_text("")
  assert "holds no scenarios" in _err(schwartz.load_scenarios, p)
  row = '{"id": "x", "value": "%s", "name": "A", "pronoun": "%s", "situation": "%s", "positive": "go", "negative": "stay"}\n'
  p.write_text(row % ("kindness", "she", "it rains"))
  assert "s.jsonl:1: unknown value 'kindness'" in _err(schwartz.load_scenarios, p)
  p.write_text(row % ("power", "it", "it rains"))
  assert "pronoun 'it'" in _err(schwartz.load_scenarios, p)
  p.write_text(row % ("power", "she", "{boss} calls"))
  assert "unknown placeholder" in _err(schwartz.load_scenarios, p)
  assert "unknown value 'kindness'" in _err(schwartz.check_values, "power,kindness")
  assert "no values named" in _err(schwartz.check_values, " , ")
  q = tmp_path / "q.jsonl"
  q.write_text('{"id": "a", "value": "power", "text": "This person likes control."}\n')
  assert "fewer than 6 items" in _err(schwartz.load_questionnaire, q, min_items=6)
  m = tmp_path / "m.jsonl"
  m.write_text('{"id": "a", "question": "q?", "choices": ["a", "b", "c"], "answer": "A"}\n')
  assert "list of 4" in _err(schwartz.load_general_mc, m)


@pytest.mark.parametrize("cls,expect", [
    (builders.MinimalPairs, lambda: sum(len(schwartz.value_pairs(v)) for v in schwartz.VALUES)),
    (builders.ContrastPairs, lambda: sum(len(schwartz.value_pairs(v, controlled=False)) for v in schwartz.VALUES)),
    (builders.NeutralSentences, lambda: len(schwartz.load_neutral())),
    (builders.ValuePrefixes, lambda: len(schwartz.VALUES)),
    (builders.ValueDilemmas, lambda: len(schwartz.load_dilemmas())),
    (builders.ValueAnswers, lambda: len(schwartz.load_answers())),
    (builders.GeneralMc, lambda: len(schwartz.load_general_mc())),
    (builders.ValueQuestionnaire, lambda: len(schwartz.load_questionnaire())),
    (builders.Roles, lambda: len(schwartz.load_roles())),
])
def test_data_sources(tmp_path, cls, expect):
  source = builders.data_source(cls, tmp_path)
  assert len(source) == expect()
  assert set(source[0]) == set(cls.FIELDS)
