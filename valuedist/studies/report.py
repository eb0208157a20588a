"""Report writing shared by the studies: figures (matplotlib's object-oriented API, no pyplot
state and no backend switching) saved as PNG, and CSV tables, each written atomically."""
from __future__ import annotations

import csv
import io
import os
import platform
import subprocess
from pathlib import Path
from typing import Iterable, Sequence

from matplotlib.figure import Figure

from valuedist.studies.engine import atomic_write


def figure(nrows: int = 1, ncols: int = 1, *, figsize: tuple[float, float], **subplots) -> tuple[Figure, object]:
  """A new figure and its axes (`Figure.subplots` arguments, e.g. squeeze=False, sharey=True)."""
  fig = Figure(figsize=figsize)
  return fig, fig.subplots(nrows, ncols, **subplots)


def save_png(fig: Figure, path: str | os.PathLike) -> None:
  """Writes a figure as PNG atomically (tight layout, 110 dpi)."""
  buf = io.BytesIO()
  fig.tight_layout()
  fig.savefig(buf, format="png", dpi=110)
  atomic_write(path, buf.getvalue())


def write_csv(path: str | os.PathLike, header: Sequence[str], rows: Iterable[Sequence]) -> None:
  """A CSV table (csv module quoting) written atomically."""
  buf = io.StringIO()
  w = csv.writer(buf)
  w.writerow(header)
  w.writerows(rows)
  atomic_write(path, buf.getvalue())


def provenance(models: dict) -> dict:
  """What a reported figure rests on (STUDY_PROTOCOL rule 14): each model's spec, file and
  quantisation ({role: checkpoints.Model}), the commit and the machine."""
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent, capture_output=True,
                            text=True, timeout=10).stdout.strip() or "unknown"
  except (OSError, subprocess.SubprocessError):
    commit = "unknown"
  import jax
  return {"models": {role: {"spec": m.name, "file": m.source, "quantization": m.quantization}
                     for role, m in models.items()},
          "commit": commit, "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
          "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}"}


def provenance_md(p: dict) -> str:
  """One paragraph naming the checkpoints (with quantisation), commit and machine."""
  models = "; ".join(f"{role}: `{m['spec']}` ({m['file']}, {m['quantization']})" for role, m in p["models"].items())
  return f"Checkpoints: {models}. Commit {p['commit'][:12]}, machine {p['machine']}, {p['devices']}."
