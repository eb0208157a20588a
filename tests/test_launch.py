"""The absl launchers: bad input is one `error:` line with exit status 2, and no INFO logs."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("launcher, flag, message", [
    ("launch.causal", "--config.models=", "config.models is empty"),
    ("launch.conva", "--config.p0s=1.5", "p0"),
    # fails after the device mesh is made, when jax has logged its backend search at INFO
    ("launch.causal", "--config.models=/nonexistent/model", "unknown model spec"),
    ("launch.gap", "--num_processes=2", "need --coordinator"),
    ("launch.gap", "--config.mesh.model=16", "mesh.model=16 needs at least 16 devices"),
])
def test_bad_input_is_one_error_line(launcher, flag, message, tmp_path):
  out = tmp_path / "out"
  proc = subprocess.run([sys.executable, "-m", launcher, flag, f"--config.out_dir={out}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr[-2000:]
  assert not out.exists()


def test_report_of_a_folder_without_a_run_is_one_error_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "launch.report", f"--dir={tmp_path}"], cwd=ROOT,
                        capture_output=True, text=True, timeout=600)
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert proc.returncode == 2 and len(lines) == 1 and "no config.json and facts.json" in lines[0], proc.stderr[-2000:]
