"""Hugging Face model directories: config.json + safetensors (sharded with an index or not),
converted by the name table in `model.params` into lazy leaves: each tensor is read only
when a slice of it is asked for (safetensors `get_slice`, memory-mapped), so placing params
on a mesh reads on each device just its own shard (`parallel.hosts.put_global`)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import ml_dtypes
import numpy as np

from valuedist.checkpoints.errors import LoadError, one_line as _one_line
from valuedist.model import families, params as P
from valuedist.model.config import ModelConfig


class SafetensorsSlice:
  """One tensor of a safetensors file, read lazily: `shape`, `dtype`, `x[index]` reads only
  that slice, `x.T` is a transposed view (2-D), `astype` a cast applied when read,
  `np.asarray(x)` reads it whole. `reads` counts the elements each read returned (tests)."""
  reads: list = []

  def __init__(self, file: Path, name: str, shape, dtype, transposed: bool = False, cast=None):
    self.file, self.name, self._shape, self._dtype = file, name, tuple(shape), np.dtype(dtype)
    self.transposed, self.cast = transposed, cast

  @property
  def shape(self) -> tuple:
    return self._shape[::-1] if self.transposed else self._shape

  @property
  def dtype(self):
    return np.dtype(self.cast) if self.cast is not None else self._dtype

  @property
  def ndim(self) -> int:
    return len(self._shape)

  @property
  def T(self) -> "SafetensorsSlice":
    return SafetensorsSlice(self.file, self.name, self._shape, self._dtype, not self.transposed, self.cast)

  def astype(self, dtype) -> "SafetensorsSlice":
    return SafetensorsSlice(self.file, self.name, self._shape, self._dtype, self.transposed, dtype)

  def __getitem__(self, index) -> np.ndarray:
    from safetensors import safe_open
    index = P.full_index(index, self.ndim)
    drop = tuple(a for a, i in enumerate(index) if isinstance(i, (int, np.integer)))      # int: a length-1 slice, dropped after
    index = tuple(slice(i % n, i % n + 1) if a in drop else i for a, (i, n) in enumerate(zip(index, self.shape)))
    with safe_open(str(self.file), framework="flax") as st:
      x = np.asarray(st.get_slice(self.name)[index[::-1] if self.transposed else index])
    x = (x.T if self.transposed else x).squeeze(drop) if drop else (x.T if self.transposed else x)
    SafetensorsSlice.reads.append(x.size)
    return x.astype(self.cast) if self.cast is not None else x

  def __array__(self, dtype=None, copy=None):
    x = self[()]
    return x.astype(dtype) if dtype is not None else x


def _hf_tensors(path: Path) -> Iterator[tuple[str, SafetensorsSlice]]:
  """(name, lazy tensor) from a directory's safetensors files, shard by shard (memory-mapped)."""
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
        found = [(name, st.get_slice(name)) for name in st.keys()]
      for name, sl in found:
        yield name, SafetensorsSlice(path / f, name, sl.get_shape(), _DTYPES[sl.get_dtype()])
    except LoadError:
      raise
    except Exception as e:  # truncated header or data
      raise LoadError(f"{path / f}: cannot read safetensors ({_one_line(e)}); the file is truncated or corrupt, "
                      "download it again") from None


_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "I64": np.int64,
           "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


def load_hf_dir(path, dtype=None) -> tuple[ModelConfig, dict]:
  """A Hugging Face model directory -> (cfg, params of lazy leaves: see `SafetensorsSlice`
  and `model.params.Stacked`; np.asarray reads one whole). dtype: cast params (default: as stored)."""
  import transformers
  path = Path(path)
  if not (path / "config.json").exists():
    raise LoadError(f"{path}: no config.json; pass a Hugging Face model directory, a .gguf file or an embedded name")
  cfg = families.config_from_hf(transformers.AutoConfig.from_pretrained(str(path)))
  return cfg, P.convert(_hf_tensors(path), cfg, dtype=dtype)
