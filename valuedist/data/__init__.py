"""Project-written data: anchor lexicons, prompts, labelled responses (formats in README.md)."""
from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import NamedTuple, Optional

DATA_DIR = Path(__file__).parent
LEXICON_DIR = DATA_DIR / "lexicons"
SIDES = ("positive", "negative")


class Lexicon(NamedTuple):
  name: str
  positive: tuple[str, ...]
  negative: tuple[str, ...]


def lexicon_names() -> list[str]:
  return sorted(p.stem for p in LEXICON_DIR.glob("*.tsv"))


def load_lexicon(name_or_path: str) -> Lexicon:
  """A shipped lexicon by name, or a user file in the same format ('<side>\\t<word>' lines)."""
  path = Path(name_or_path)
  if not path.exists():
    path = LEXICON_DIR / f"{name_or_path}.tsv"
    if not path.exists():
      raise ValueError(f"unknown lexicon {name_or_path!r}: give a file path or one of {', '.join(lexicon_names())}")
  words = {s: [] for s in SIDES}
  for n, line in enumerate(path.read_text().splitlines(), 1):
    line = line.strip()
    if not line or line.startswith("#"):
      continue
    parts = line.split("\t")
    if len(parts) != 2 or parts[0] not in SIDES or not parts[1].strip():
      raise ValueError(f"{path}:{n}: expected '<positive|negative><TAB><word>', got {line!r}")
    words[parts[0]].append(parts[1].strip())
  for side in SIDES:
    if not words[side]:
      raise ValueError(f"{path}: lexicon has no {side} words; add '{side}<TAB>word' lines")
  both = sorted(set(words["positive"]) & set(words["negative"]))
  if both:
    raise ValueError(f"{path}: {both[0]!r} is on both sides; a word must be positive or negative, not both")
  return Lexicon(path.stem, tuple(dict.fromkeys(words["positive"])), tuple(dict.fromkeys(words["negative"])))


def _read_jsonl(path: Path) -> list[dict]:
  rows = []
  for n, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object") from None
    if not isinstance(row, dict):
      raise ValueError(f"{path}:{n}: each line must be a JSON object")
    rows.append(row)
  return rows


def load_prompts(path: Optional[str] = None) -> list[dict]:
  """Prompts as dicts with id, category, value, prompt. Default: the shipped set; else a user
  JSONL (one object per line) or CSV (header row) with at least a 'prompt' field."""
  p = Path(path) if path else DATA_DIR / "prompts.jsonl"
  if not p.exists():
    raise ValueError(f"prompt file {p} does not exist")
  if p.suffix == ".csv":
    with open(p, newline="") as f:
      rows = list(csv.DictReader(f))
  else:
    rows = _read_jsonl(p)
  if not rows:
    raise ValueError(f"{p}: no prompts; add lines with a 'prompt' field")
  out = []
  for n, r in enumerate(rows, 1):
    text = (r.get("prompt") or "").strip()
    if not text:
      raise ValueError(f"{p}: row {n} has no 'prompt' text")
    out.append({"id": str(r.get("id") or f"p{n:04d}"), "category": r.get("category") or None,
                "value": r.get("value") or None, "prompt": text})
  ids = [r["id"] for r in out]
  if len(set(ids)) != len(ids):
    raise ValueError(f"{p}: prompt ids are not unique")
  return out


def load_refusal_labels() -> list[dict]:
  """Labelled assistant responses: {'text', 'label': 'refusal' | 'compliance'}."""
  return _read_jsonl(DATA_DIR / "refusal_labels.jsonl")
