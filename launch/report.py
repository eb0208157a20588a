"""Recomputes every table and plot of a finished study run from its folder alone.
Usage: python -m launch.report --dir results/conva_smollm2"""
import json
import sys
from pathlib import Path

from absl import app, flags

from valuedist.studies import conva, gap

_DIR = flags.DEFINE_string("dir", None, "A study's output folder (with config.json and records.jsonl).")


def report(folder: str) -> None:
  """Dispatches on the study that wrote `folder` (its config.json)."""
  out = Path(folder)
  if not (out / "config.json").is_file() or not (out / "facts.json").is_file():
    raise ValueError(f"{out} has no config.json and facts.json; give the folder a gap or ConVA run wrote")
  c = json.loads((out / "config.json").read_text())
  study = gap if "aligned" in c else conva if "judge_kind" in c else None
  if study is None:
    raise ValueError(f"{out}/config.json belongs to no study this command recomputes (gap, conva)")
  study.report_dir(out)


def main(argv):
  del argv
  try:
    report(_DIR.value or "")
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
