"""Checks shared by the study test files."""
import json
import shutil


def assert_report_recomputes(out_full, report_dir, tmp_path) -> None:
  """launch.report's path: a copy of a finished run's folder, its summary and tables deleted
  and its records stored in reverse order (as a resumed or re-batched run might append them),
  yields the same summary, tables and report from the folder alone."""
  out = tmp_path / "copy"
  shutil.copytree(out_full, out)
  for name in ("summary.json", "report.md", "results.csv", "steps.csv", "summary.txt"):
    (out / name).unlink(missing_ok=True)
  lines = (out / "records.jsonl").read_text().splitlines(keepends=True)
  assert len(lines) > 1 and lines != lines[::-1]
  (out / "records.jsonl").write_text("".join(lines[::-1]))
  again = report_dir(out)
  assert json.loads(json.dumps(again)) == json.loads((out_full / "summary.json").read_text())
  for name in ("report.md", "results.csv", "steps.csv", "summary.txt"):
    if (out_full / name).exists():
      assert (out / name).read_text() == (out_full / name).read_text(), name
