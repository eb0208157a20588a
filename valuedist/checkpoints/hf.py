"""Hugging Face model directories: config.json + safetensors (sharded with an index or not),
read memory-mapped and converted by the name table in `model.params`."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from valuedist.checkpoints.errors import LoadError, one_line as _one_line
from valuedist.model import families, params as P
from valuedist.model.config import ModelConfig


def _hf_tensors(path: Path) -> Iterator[tuple[str, np.ndarray]]:
  """(name, array) from a directory's safetensors files, shard by shard (memory-mapped)."""
  from safetensors import safe_open
  index = path / "model.safetensors.index.json"
  if index.exists():
    weight_map = json.loads(index.read_text())["weight_map"]
    files = sorted(set(weight_map.values()))
    missing = [f for f in files if not (path / f).exists()]
    if missing:
      raise LoadError(f"{path}: shard {missing[0]} is listed in model.safetensors.index.json but missing; "
                      "download the complete checkpoint")
  else:
    files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
      raise LoadError(f"{path}: no *.safetensors files; save the model with safe_serialization=True")
  for f in files:
    try:
      with safe_open(str(path / f), framework="flax") as st:
        for name in st.keys():
          yield name, np.asarray(st.get_tensor(name))
    except LoadError:
      raise
    except Exception as e:  # truncated header or data
      raise LoadError(f"{path / f}: cannot read safetensors ({_one_line(e)}); the file is truncated or corrupt, "
                      "download it again") from None


def load_hf_dir(path, dtype=None) -> tuple[ModelConfig, dict]:
  """A Hugging Face model directory -> (cfg, params). dtype: cast params (default: as stored)."""
  import transformers
  path = Path(path)
  if not (path / "config.json").exists():
    raise LoadError(f"{path}: no config.json; pass a Hugging Face model directory, a .gguf file or an embedded name")
  cfg = families.config_from_hf(transformers.AutoConfig.from_pretrained(str(path)))
  return cfg, P.convert(_hf_tensors(path), cfg, dtype=dtype)
