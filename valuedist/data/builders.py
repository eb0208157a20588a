"""tensorflow-datasets builders for the shipped data: array_record files, no TensorFlow needed.

    from valuedist.data import builders
    source = builders.data_source(builders.ValuePrompts, data_dir)   # random access, len(), [i]
"""
from __future__ import annotations

import json
from pathlib import Path

import tensorflow_datasets as tfds

from valuedist.data import DATA_DIR


class JsonlBuilder(tfds.core.GeneratorBasedBuilder):
  """Base: one 'train' split from a shipped JSONL file whose keys are all text features.
  Subclasses set FILE and FIELDS (and VERSION / description)."""
  FILE: str = ""
  FIELDS: tuple[str, ...] = ()
  VERSION = tfds.core.Version("1.0.0")

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({k: tfds.features.Text() for k in self.FIELDS}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(DATA_DIR / self.FILE)}

  def _generate_examples(self, path: Path):
    for i, line in enumerate(path.read_text().splitlines()):
      if line.strip():
        row = json.loads(line)
        yield i, {k: str(row.get(k) or "") for k in self.FIELDS}


class ValuePrompts(JsonlBuilder):
  """The project's prompt set: harmful requests, honesty probes, value dilemmas, neutral requests."""
  FILE = "prompts.jsonl"
  FIELDS = ("id", "category", "value", "prompt")


class RefusalLabels(JsonlBuilder):
  """Assistant responses labelled refusal / compliance (training data for refusal judges)."""
  FILE = "refusal_labels.jsonl"
  FIELDS = ("text", "label")


def data_source(builder_cls, data_dir, split: str = "train"):
  """Prepares the builder's array_record files under data_dir (once) and returns its data source."""
  builder = builder_cls(data_dir=str(data_dir), file_format="array_record")
  builder.download_and_prepare()
  return builder.as_data_source()[split]
