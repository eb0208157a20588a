"""Report writing shared by the studies: figures (matplotlib's object-oriented API, no pyplot
state and no backend switching) saved as PNG, and CSV tables, each written atomically."""
from __future__ import annotations

import csv
import io
import os
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
