"""The project's data on Schwartz's 10 basic values: minimal-pair scenarios, test dilemmas,
value prefixes, a multiple-choice capability set, a portrait questionnaire and roles.

    from valuedist.data import schwartz
    schwartz.VALUES                                   # the 10 value keys, circumplex order
    schwartz.value_pairs("power")                     # context-controlled minimal pairs (4 forms)
    schwartz.value_pairs("power", controlled=False)   # value texts vs unrelated neutral text
    schwartz.load_dilemmas(), load_answers(), load_prefixes(), load_general_mc(), load_questionnaire(), load_roles()

Every loader validates its file and reports bad input as a one-line ValueError naming the
file, line, problem and fix. Formats are documented in valuedist/data/README.md.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple, Optional, Sequence

from valuedist.data import DATA_DIR, PathLike, read_jsonl

# Circumplex order (Schwartz 1992): neighbours are compatible, opposite positions conflict.
VALUES = ("self_direction", "stimulation", "hedonism", "achievement", "power",
          "security", "conformity", "tradition", "benevolence", "universalism")

SCENARIOS_FILE = DATA_DIR / "value_scenarios.jsonl"
DILEMMAS_FILE = DATA_DIR / "value_dilemmas.jsonl"
PREFIXES_FILE = DATA_DIR / "value_prefixes.jsonl"
NEUTRAL_FILE = DATA_DIR / "neutral_sentences.jsonl"
GENERAL_MC_FILE = DATA_DIR / "general_mc.jsonl"
QUESTIONNAIRE_FILE = DATA_DIR / "value_questionnaire.jsonl"
ROLES_FILE = DATA_DIR / "roles.jsonl"
ANSWERS_FILE = DATA_DIR / "value_answers.jsonl"
JUDGE_ANSWERS_FILE = DATA_DIR / "value_judge_answers.jsonl"   # judge training only, disjoint from ANSWERS_FILE
ANSWER_LABELS = ("toward", "away")

# The four forms of a scenario; {choice} is the positive or the negative verb phrase.
FORMS = {
    "statement": "When {situation}, I {choice}.",
    "vignette": "When {situation}, {name} decided to {choice}.",
    "how_question": "When {situation}, how can I {choice}?",
    "decision_question": "When {situation}, should {name} {choice}?",
}
FIRST_PERSON = {"obj": "me", "poss": "my", "refl": "myself"}
THIRD_PERSON = {"she": {"obj": "her", "poss": "her", "refl": "herself"},
                "he": {"obj": "him", "poss": "his", "refl": "himself"}}
QUESTION_FORMS = ("how_question", "decision_question")
MC_LETTERS = ("A", "B", "C", "D")


class Pair(NamedTuple):
  """One minimal pair: the same scenario told choosing for (positive) and against the value."""
  id: str
  value: str
  form: str
  positive: str
  negative: str


def check_value(name: str) -> str:
  if name not in VALUES:
    raise ValueError(f"unknown value {name!r}; use one of {', '.join(VALUES)}")
  return name


def check_values(names: Sequence[str] | str) -> list[str]:
  """'all', a comma list or a sequence of value keys -> checked list (non-empty)."""
  if isinstance(names, str):
    names = list(VALUES) if names.strip() == "all" else [s.strip() for s in names.split(",") if s.strip()]
  if not names:
    raise ValueError("no values named; give value keys such as power,security or 'all'")
  return [check_value(n) for n in names]


def _rows(path: PathLike, fields: Sequence[str], what: str) -> list[tuple[int, dict]]:
  path = Path(path)
  rows = read_jsonl(path)
  if not rows:
    raise ValueError(f"{path}: the file holds no {what}; add one JSON object per line with {', '.join(fields)}")
  seen = {}
  for n, r in rows:
    for f in fields:
      if not isinstance(r.get(f), str) or not r[f].strip():
        raise ValueError(f"{path}:{n}: no {f!r}; every line needs a non-empty string {f!r}")
    if "value" in fields and r["value"] not in VALUES:
      raise ValueError(f"{path}:{n}: unknown value {r['value']!r}; use one of {', '.join(VALUES)}")
    if "id" in fields:
      if r["id"] in seen:
        raise ValueError(f"{path}:{n}: duplicate id {r['id']!r} (first on line {seen[r['id']]}); give every line its own id")
      seen[r["id"]] = n
  return rows


# ----------------------------------------------------------------------------- minimal pairs

def render(scenario: dict, form: str, side: str) -> str:
  """One sentence of a scenario: form in FORMS, side 'positive' or 'negative'."""
  person = FIRST_PERSON if form in ("statement", "how_question") else THIRD_PERSON[scenario["pronoun"]]
  choice = scenario[side].format(**person)
  return FORMS[form].format(situation=scenario["situation"].format(**person), name=scenario["name"], choice=choice)


def load_scenarios(path: Optional[PathLike] = None) -> list[dict]:
  """Scenario dicts {'id', 'value', 'name', 'pronoun', 'situation', 'positive', 'negative'}."""
  p = Path(path) if path else SCENARIOS_FILE
  rows = _rows(p, ("id", "value", "name", "pronoun", "situation", "positive", "negative"), "scenarios")
  out = []
  for n, r in rows:
    if r["pronoun"] not in THIRD_PERSON:
      raise ValueError(f"{p}:{n}: pronoun {r['pronoun']!r} is not she or he; use one of them")
    try:
      for form in FORMS:
        for side in ("positive", "negative"):
          text = render(r, form, side)
          if "{" in text or "}" in text:
            raise KeyError("a brace")
    except (KeyError, IndexError, ValueError) as e:
      raise ValueError(f"{p}:{n}: unknown placeholder {e}; use only {{obj}}, {{poss}} and {{refl}}") from None
    if r["positive"].strip() == r["negative"].strip():
      raise ValueError(f"{p}:{n}: positive and negative are the same; a minimal pair needs two different choices")
    out.append({k: r[k].strip() for k in ("id", "value", "name", "pronoun", "situation", "positive", "negative")})
  return out


def value_pairs(value: str, *, controlled: bool = True, forms: Sequence[str] = tuple(FORMS),
                scenarios: Optional[list[dict]] = None, neutral: Optional[Sequence[str]] = None) -> list[Pair]:
  """The pairs for one value.

  controlled=True: context-controlled minimal pairs, one per scenario and form (positive and
  negative differ only in the choice). controlled=False: the contrast set, whose positive
  side is the same value texts and whose negative side is unrelated neutral text (cycled),
  so a probe can separate them by context alone."""
  check_value(value)
  scenarios = [s for s in (scenarios if scenarios is not None else load_scenarios()) if s["value"] == value]
  if not scenarios:
    raise ValueError(f"no scenarios for value {value!r} in the pair file; add lines with \"value\": \"{value}\"")
  unknown = [f for f in forms if f not in FORMS]
  if unknown or not forms:
    raise ValueError(f"unknown pair form(s) {unknown}; use some of {', '.join(FORMS)}")
  pairs = [Pair(f"{s['id']}/{form}", value, form, render(s, form, "positive"), render(s, form, "negative"))
           for form in forms for s in scenarios]
  if controlled:
    return pairs
  neutral = list(neutral if neutral is not None else load_neutral())
  offset = VALUES.index(value) * 7           # each value sees the neutral pool in another order
  return [Pair(p.id, value, p.form, p.positive, neutral[(i + offset) % len(neutral)]) for i, p in enumerate(pairs)]


def load_neutral(path: Optional[PathLike] = None) -> list[str]:
  """Value-neutral sentences (the negative side of the non-controlled contrast sets)."""
  return [r["text"].strip() for _, r in _rows(path or NEUTRAL_FILE, ("id", "text"), "sentences")]


# ----------------------------------------------------------------------------- evaluation sets

def load_dilemmas(path: Optional[PathLike] = None) -> list[dict]:
  """Held-out test dilemmas {'id', 'value', 'question'}."""
  return [{k: r[k].strip() for k in ("id", "value", "question")}
          for _, r in _rows(path or DILEMMAS_FILE, ("id", "value", "question"), "dilemmas")]


def load_answers(path: Optional[PathLike] = None) -> list[dict]:
  """Labelled answers {'id', 'value', 'label' ('toward' or 'away'), 'question', 'answer'}:
  assistant answers that lean towards or away from a value (default: the judge validation
  set; `JUDGE_ANSWERS_FILE` is the judge's training set, same format)."""
  p = Path(path or ANSWERS_FILE)
  out = []
  for n, r in _rows(p, ("id", "value", "label", "question", "answer"), "answers"):
    if r["label"] not in ANSWER_LABELS:
      raise ValueError(f"{p}:{n}: label {r['label']!r} is not toward or away")
    out.append({k: r[k].strip() for k in ("id", "value", "label", "question", "answer")})
  return out


def load_prefixes(path: Optional[PathLike] = None) -> dict[str, dict]:
  """{value: {'description': str, 'high': str, 'opposite': str}}: a short noun phrase for
  the value (used by the LLM judge), the prompting baseline's prefix and the robustness
  test's opposite prefix, for every value."""
  p = Path(path or PREFIXES_FILE)
  keys = ("description", "high", "opposite")
  rows = _rows(p, ("value",) + keys, "prefixes")
  out = {r["value"]: {k: r[k].strip() for k in keys} for _, r in rows}
  missing = [v for v in VALUES if v not in out]
  if missing:
    raise ValueError(f"{p}: no prefixes for {', '.join(missing)}; add one line per value")
  return out


def load_general_mc(path: Optional[PathLike] = None) -> list[dict]:
  """Multiple-choice questions {'id', 'subject', 'question', 'choices': [4], 'answer': 0..3}."""
  p = Path(path or GENERAL_MC_FILE)
  out = []
  for n, r in _rows(p, ("id", "question", "answer"), "questions"):
    choices = r.get("choices")
    if not isinstance(choices, list) or len(choices) != 4 or not all(isinstance(c, str) and c.strip() for c in choices):
      raise ValueError(f"{p}:{n}: 'choices' must be a list of 4 non-empty strings")
    if r["answer"] not in MC_LETTERS:
      raise ValueError(f"{p}:{n}: answer {r['answer']!r} is not one of A, B, C, D")
    out.append({"id": r["id"], "subject": str(r.get("subject", "")), "question": r["question"].strip(),
                "choices": [c.strip() for c in choices], "answer": MC_LETTERS.index(r["answer"])})
  return out


def mc_prompt(q: dict) -> str:
  """The question as the model sees it; the answer is read from the option-letter logits."""
  options = "\n".join(f"{l}. {c}" for l, c in zip(MC_LETTERS, q["choices"]))
  return f"{q['question']}\n{options}\nAnswer with the letter of the correct option."


# ----------------------------------------------------------------------------- questionnaire, roles

def load_questionnaire(path: Optional[PathLike] = None, min_items: int = 1) -> list[dict]:
  """Portrait items {'id', 'value', 'text'}; every value needs at least min_items items."""
  p = Path(path or QUESTIONNAIRE_FILE)
  items = [{k: r[k].strip() for k in ("id", "value", "text")} for _, r in _rows(p, ("id", "value", "text"), "items")]
  short = [v for v in VALUES if sum(i["value"] == v for i in items) < min_items]
  if short:
    raise ValueError(f"{p}: fewer than {min_items} items for {', '.join(short)}; add items for every value")
  return items


def load_roles(path: Optional[PathLike] = None) -> list[dict]:
  """Roles (personas) {'id', 'group', 'role'}; the role text is used as a system prompt."""
  return [{"id": r["id"].strip(), "group": str(r.get("group", "")).strip(), "role": r["role"].strip()}
          for _, r in _rows(path or ROLES_FILE, ("id", "role"), "roles")]
