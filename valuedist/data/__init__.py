"""Project-written data: anchor lexicons, prompts, labelled responses (formats in README.md).

    from valuedist import data
    data.lexicon_names()                  # ['achievement', ..., 'universalism']
    data.load_lexicon("harmless")         # Lexicon(name, positive=(...), negative=(...))
    data.load_lexicon("my_words.tsv")     # a user file in the same format
    data.load_prompts()                   # shipped prompts; or load_prompts("mine.csv" / "mine.jsonl")
    data.load_refusal_labels()            # [{'text': ..., 'label': 'refusal' | 'compliance' | 'non_answer'}]

Every loader is pure (reads files, returns plain values) and reports bad input as a one-line
ValueError that names the file, the line where there is one, the problem and the fix.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import NamedTuple, Optional, Union

DATA_DIR = Path(__file__).parent
LEXICON_DIR = DATA_DIR / "lexicons"
PROMPTS_FILE = DATA_DIR / "prompts.jsonl"
REFUSAL_LABELS_FILE = DATA_DIR / "refusal_labels.jsonl"
REFUSAL_VALIDATION_FILE = DATA_DIR / "refusal_validation.jsonl"   # labelled generations of the embedded models
REFUSAL_GENERATIONS_FILE = DATA_DIR / "refusal_generations.jsonl"  # labelled generations on other prompts: training
SIDES = ("positive", "negative")
CATEGORIES = ("harmful", "honesty", "dilemma", "neutral")
LABELS = ("refusal", "compliance", "non_answer")

PathLike = Union[str, Path]

__all__ = ["Lexicon", "lexicon_names", "load_lexicon", "load_prompts", "load_refusal_labels", "read_jsonl",
           "DATA_DIR", "LEXICON_DIR", "PROMPTS_FILE", "REFUSAL_LABELS_FILE", "REFUSAL_VALIDATION_FILE",
           "REFUSAL_GENERATIONS_FILE", "SIDES", "CATEGORIES", "LABELS"]


class Lexicon(NamedTuple):
  """Anchor words of one lexicon; each side keeps file order, duplicates dropped."""
  name: str
  positive: tuple[str, ...]
  negative: tuple[str, ...]


def _short(text: str, limit: int = 60) -> str:
  """repr of a line for an error message: one line, bounded length."""
  return repr(text if len(text) <= limit else text[:limit] + "...")


def _read_text(path: Path, what: str, fix: str) -> str:
  if not path.is_file():
    raise ValueError(f"{what} {str(path)!r} does not exist or is not a file; {fix}")
  try:
    return path.read_text(encoding="utf-8-sig")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None


# ----------------------------------------------------------------------------- lexicons

def lexicon_names() -> list[str]:
  """Names of the shipped lexicons (file stems under lexicons/)."""
  return sorted(p.stem for p in LEXICON_DIR.glob("*.tsv"))


def _lexicon_path(name_or_path: PathLike) -> Path:
  s = str(name_or_path)
  p = Path(s)
  names = lexicon_names()
  if s in names:                      # a bare shipped name wins over a same-named file in the cwd
    return LEXICON_DIR / f"{s}.tsv"
  if p.is_file():
    return p
  if p.suffix or len(p.parts) > 1:
    raise ValueError(f"lexicon file {s!r} does not exist; give an existing .tsv path or a shipped name "
                     f"({', '.join(names)})")
  raise ValueError(f"unknown lexicon {s!r}; use one of {', '.join(names)} or a path to a "
                   "'<positive|negative><TAB><word>' file")


def load_lexicon(name_or_path: PathLike) -> Lexicon:
  """A shipped lexicon by name, or a user file in the same format: '<side>\\t<word>' lines,
  side 'positive' or 'negative', '#' comments and blank lines ignored. The name is the file stem."""
  path = _lexicon_path(name_or_path)
  text = _read_text(path, "lexicon file", "give an existing .tsv path or a shipped name")
  words: dict[str, dict[str, int]] = {s: {} for s in SIDES}     # word -> first line, per side
  for n, raw in enumerate(text.splitlines(), 1):
    line = raw.strip()
    if not line or line.startswith("#"):
      continue
    side, _, word = line.partition("\t")
    side, word = side.strip(), word.strip()
    if side not in SIDES or not word:
      raise ValueError(f"{path}:{n}: malformed line {_short(line)}; write '<positive|negative><TAB><word>' "
                       "or start the line with '#' for a comment")
    if any(c.isspace() for c in word):
      raise ValueError(f"{path}:{n}: {word!r} is not a single word; put one anchor word per line")
    words[side].setdefault(word, n)
  for side in SIDES:
    if not words[side]:
      raise ValueError(f"{path}: lexicon has no {side} words; add at least one '{side}<TAB>word' line")
  positive = {w.lower(): (w, n) for w, n in words["positive"].items()}
  for w, n in words["negative"].items():
    if w.lower() in positive:
      pw, pn = positive[w.lower()]
      raise ValueError(f"{path}:{n}: {w!r} is negative but {pw!r} is positive (line {pn}); "
                       "a word may be on one side only, remove one of the lines")
  return Lexicon(path.stem, tuple(words["positive"]), tuple(words["negative"]))


# ----------------------------------------------------------------------------- tables

def read_jsonl(path: PathLike) -> list[tuple[int, dict]]:
  """(line number, object) for every non-blank line of a JSONL file; one-line errors."""
  path = Path(path)
  text = _read_text(path, "file", "pass an existing JSONL file")
  rows = []
  for n, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{n}: malformed line, not valid JSON ({e.msg} at column {e.colno}); "
                       "write one JSON object per line") from None
    if not isinstance(row, dict):
      raise ValueError(f"{path}:{n}: malformed line, a JSON {type(row).__name__} rather than an object; "
                       "write one JSON object per line")
    rows.append((n, row))
  return rows


def _read_csv(path: Path, required: str) -> list[tuple[int, dict]]:
  """(line number, row) for every data row of a CSV file with a header row."""
  text = _read_text(path, "file", "pass an existing CSV file")
  reader = csv.DictReader(text.splitlines())
  try:
    header = [h.strip() for h in (reader.fieldnames or [])]
    if not header:
      return []
    if required not in header:
      raise ValueError(f"{path}:1: the header has no {required!r} column (it has {', '.join(map(repr, header))}); "
                       f"name the column {required!r}")
    reader.fieldnames = header
    rows = []
    for row in reader:
      if None in row:
        raise ValueError(f"{path}:{reader.line_num}: malformed line, more cells than the header's "
                         f"{len(header)} columns; quote cells that contain commas")
      rows.append((reader.line_num, row))
    return rows
  except csv.Error as e:
    raise ValueError(f"{path}:{reader.line_num}: malformed CSV ({e}); fix the quoting on that line") from None


def _text(value) -> Optional[str]:
  """Optional text field: None for missing / null / empty, else the string form."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return None
  return str(value).strip()


# ----------------------------------------------------------------------------- prompts

def load_prompts(path: Optional[PathLike] = None) -> list[dict]:
  """Prompts as dicts {'id', 'category', 'value', 'prompt'}. Default: the shipped set. Else a user
  file: CSV (by its .csv suffix) with a header row, or JSONL (one object per line); 'prompt' is
  required, 'id' (default 'p0001', ... by row), 'category' and 'value' are optional (None)."""
  p = Path(path) if path else PROMPTS_FILE
  fix = "pass an existing .jsonl or .csv file, or leave it empty for the shipped prompts"
  if not p.is_file():
    raise ValueError(f"prompt file {str(p)!r} does not exist or is not a file; {fix}")
  rows = _read_csv(p, "prompt") if p.suffix.lower() == ".csv" else read_jsonl(p)
  if not rows:
    raise ValueError(f"{p}: no prompts in the file; add rows with a 'prompt' field")
  out, seen = [], {}
  for i, (n, r) in enumerate(rows, 1):
    text = r.get("prompt")
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"{p}:{n}: no 'prompt' text; every row needs a non-empty string 'prompt'")
    pid = _text(r.get("id")) or f"p{i:04d}"
    if pid in seen:
      raise ValueError(f"{p}:{n}: duplicate id {pid!r} (first on line {seen[pid]}); give every prompt its own id")
    seen[pid] = n
    out.append({"id": pid, "category": _text(r.get("category")), "value": _text(r.get("value")),
                "prompt": text.strip()})
  return out


# ----------------------------------------------------------------------------- refusal labels

def load_refusal_labels(path: Optional[PathLike] = None) -> list[dict]:
  """Labelled assistant responses [{'text', 'label'}], label 'refusal', 'compliance' or 'non_answer'.
  Default: the shipped set; else a JSONL file in the same format."""
  p = Path(path) if path else REFUSAL_LABELS_FILE
  rows = read_jsonl(p)
  if not rows:
    raise ValueError(f"{p}: no labelled responses in the file; add {{\"text\": ..., \"label\": ...}} lines")
  out = []
  for n, r in rows:
    text, label = r.get("text"), r.get("label")
    if not isinstance(text, str) or not text.strip():
      raise ValueError(f"{p}:{n}: no 'text'; every line needs a non-empty string 'text'")
    if label not in LABELS:
      raise ValueError(f"{p}:{n}: label {label!r} is not one of {', '.join(LABELS)}; use one of them")
    out.append({"text": text.strip(), "label": label})
  return out
