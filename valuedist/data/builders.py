"""tensorflow-datasets builders for the shipped data: array_record files, no TensorFlow needed.

    from valuedist.data import builders
    source = builders.prompts_data_source(data_dir)        # random access: len(source), source[i]
    source[0]   # {'id': b'harmful-000', 'category': b'harmful', 'value': b'harmless', 'prompt': b'...'}
    labels = builders.data_source(builders.RefusalLabels, data_dir)

Rows keep file order. Text features come back as bytes (decode with .decode()); a missing value is stored as ''.
A prepared copy records the SHA-256 of the shipped file it was built from; when the shipped
file changes, `data_source` rebuilds the copy in place rather than serve stale rows.

Adding a data set: put `<name>.jsonl` next to prompts.jsonl and subclass `JsonlBuilder`
with FILE and FIELDS (every field a text feature); override `rows` to validate through a
loader. tfds names the builder after the class (`MinimalPairs` -> 'minimal_pairs').
"""
from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Iterator

import tensorflow_datasets as tfds

from valuedist import data
from valuedist.data import schwartz

FILE_FORMAT = "array_record"


class JsonlBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: one 'train' split from one shipped JSONL file whose fields are all text.
  Subclasses set FILE (name under valuedist/data/) and FIELDS, and may override `rows`."""
  FILE: str = ""
  ALSO: tuple[str, ...] = ()          # further shipped files the rows are built from
  FIELDS: tuple[str, ...] = ()
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  @classmethod
  def source(cls) -> Path:
    return data.DATA_DIR / cls.FILE

  @classmethod
  def fingerprint(cls) -> str:
    """SHA-256 of the shipped file(s); stored with a prepared copy to detect staleness."""
    h = hashlib.sha256()
    for name in (cls.FILE,) + cls.ALSO:
      h.update((data.DATA_DIR / name).read_bytes())
    return h.hexdigest()

  @classmethod
  def rows(cls) -> list[dict]:
    """The examples, in file order. Default: the file's objects as they are."""
    return [row for _, row in data.read_jsonl(cls.source())]

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=(type(self).__doc__ or "").strip(),
        features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in self.FIELDS}),
        disable_shuffling=True,                # serve rows in file order
        metadata=tfds.core.MetadataDict(source_file=self.FILE, source_sha256=self.fingerprint()))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples()}

  def _generate_examples(self) -> Iterator[tuple[int, dict]]:
    for i, row in enumerate(self.rows()):
      yield i, {k: "" if row.get(k) is None else str(row[k]) for k in self.FIELDS}


class ValuePrompts(JsonlBuilder):
  """The project's prompt set: harmful requests, honesty probes, value dilemmas, neutral requests."""
  FILE = "prompts.jsonl"
  FIELDS = ("id", "category", "value", "prompt")

  @classmethod
  def rows(cls) -> list[dict]:
    return data.load_prompts(cls.source())


class RefusalLabels(JsonlBuilder):
  """Assistant responses labelled refusal / compliance / non-answer (training data for refusal judges)."""
  FILE = "refusal_labels.jsonl"
  FIELDS = ("text", "label")

  @classmethod
  def rows(cls) -> list[dict]:
    return data.load_refusal_labels(cls.source())


class MinimalPairs(JsonlBuilder):
  """Context-controlled minimal pairs for Schwartz's 10 values, rendered from the shipped
  scenarios in four forms (statement, vignette, how_question, decision_question)."""
  FILE = "value_scenarios.jsonl"
  FIELDS = ("id", "value", "form", "positive", "negative")

  @classmethod
  def rows(cls) -> list[dict]:
    scenarios = schwartz.load_scenarios(cls.source())
    return [p._asdict() for v in schwartz.VALUES for p in schwartz.value_pairs(v, scenarios=scenarios)]


class ContrastPairs(JsonlBuilder):
  """The non-context-controlled contrast set: the same value texts as MinimalPairs on the
  positive side, unrelated neutral sentences on the negative side (shows the context bias)."""
  FILE = "value_scenarios.jsonl"
  ALSO = ("neutral_sentences.jsonl",)
  FIELDS = ("id", "value", "form", "positive", "negative")

  @classmethod
  def rows(cls) -> list[dict]:
    scenarios = schwartz.load_scenarios(cls.source())
    neutral = schwartz.load_neutral(data.DATA_DIR / cls.ALSO[0])
    return [p._asdict() for v in schwartz.VALUES
            for p in schwartz.value_pairs(v, controlled=False, scenarios=scenarios, neutral=neutral)]


class NeutralSentences(JsonlBuilder):
  """Value-neutral sentences (weather, recipes, timetables...)."""
  FILE = "neutral_sentences.jsonl"
  FIELDS = ("id", "text")

  @classmethod
  def rows(cls) -> list[dict]:
    schwartz.load_neutral(cls.source())                  # validates the file
    return [{"id": r["id"], "text": r["text"].strip()} for _, r in data.read_jsonl(cls.source())]


class ValuePrefixes(JsonlBuilder):
  """Per value: a short description, the prompting baseline's 'high' prefix and the
  robustness test's 'opposite' prefix."""
  FILE = "value_prefixes.jsonl"
  FIELDS = ("value", "description", "high", "opposite")

  @classmethod
  def rows(cls) -> list[dict]:
    return [dict(value=v, **p) for v, p in schwartz.load_prefixes(cls.source()).items()]


class ValueDilemmas(JsonlBuilder):
  """Held-out test dilemmas that an answer can resolve towards or away from a value."""
  FILE = "value_dilemmas.jsonl"
  FIELDS = ("id", "value", "question")

  @classmethod
  def rows(cls) -> list[dict]:
    return schwartz.load_dilemmas(cls.source())


class ValueAnswers(JsonlBuilder):
  """Assistant answers labelled as leaning towards or away from a value (judge validation)."""
  FILE = "value_answers.jsonl"
  FIELDS = ("id", "value", "label", "question", "answer")

  @classmethod
  def rows(cls) -> list[dict]:
    return schwartz.load_answers(cls.source())


class GeneralMc(JsonlBuilder):
  """General-knowledge multiple-choice questions; choices joined by newlines, answer a letter."""
  FILE = "general_mc.jsonl"
  FIELDS = ("id", "subject", "question", "choices", "answer")

  @classmethod
  def rows(cls) -> list[dict]:
    return [dict(q, choices="\n".join(q["choices"]), answer=schwartz.MC_LETTERS[q["answer"]])
            for q in schwartz.load_general_mc(cls.source())]


class ValueQuestionnaire(JsonlBuilder):
  """Portrait-style value questionnaire items (answers 1-6)."""
  FILE = "value_questionnaire.jsonl"
  FIELDS = ("id", "value", "text")

  @classmethod
  def rows(cls) -> list[dict]:
    return schwartz.load_questionnaire(cls.source())


class Roles(JsonlBuilder):
  """Roles (personas) given to a model as system prompts."""
  FILE = "roles.jsonl"
  FIELDS = ("id", "group", "role")

  @classmethod
  def rows(cls) -> list[dict]:
    return schwartz.load_roles(cls.source())


def prepare(builder_cls: type[JsonlBuilder], data_dir) -> tfds.core.DatasetBuilder:
  """Writes the builder's array_record files under data_dir (once; again if the shipped file
  changed since) and returns the prepared builder."""
  builder = builder_cls(data_dir=str(data_dir), file_format=FILE_FORMAT)
  if builder.is_prepared():
    if builder.info.metadata.get("source_sha256") == builder_cls.fingerprint():
      return builder
    shutil.rmtree(builder.data_dir)           # stale: built from an older version of the shipped file
    builder = builder_cls(data_dir=str(data_dir), file_format=FILE_FORMAT)
  builder.download_and_prepare(file_format=FILE_FORMAT,
                               download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  return builder


def data_source(builder_cls: type[JsonlBuilder], data_dir, split: str = "train"):
  """Random-access data source (len(), [i]) of one split, prepared under data_dir if needed."""
  return prepare(builder_cls, data_dir).as_data_source()[split]


def prompts_data_source(data_dir):
  """The shipped prompts as an array_record data source: len() == len(load_prompts())."""
  return data_source(ValuePrompts, data_dir)
