"""Checkpoints -> (ModelConfig, params, tokenizer): Hugging Face directories, GGUF files and
the embedded default models, with an orbax cache of converted params.

Model specs accepted by `load`:
  an embedded name   smollm2-135m-instruct (aligned), gemma-3-270m (base, unaligned)
  a directory        config.json + *.safetensors (sharded with an index or not) + tokenizer files
  a .gguf file       llama or gemma3 architecture; tokenizer and chat template come from the file
  a hub id           org/name[@revision]: the snapshot in the local Hugging Face cache, or downloaded
No PyTorch model is ever built: tensors are read with safetensors / gguf and converted by the
name table in `model/params.py`. GGUF files and embedded models are converted once and cached
(params with orbax, config as JSON, tokenizer with save_pretrained) under `cache_dir`.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from valuedist.checkpoints import hub
from valuedist.checkpoints.cache import converted_gguf, default_cache_dir, restore_params, save_params
from valuedist.checkpoints.embedded import EMBEDDED, embedded_gguf
from valuedist.checkpoints.errors import LoadError
from valuedist.checkpoints.gguf_files import load_gguf, quantization, read_gguf_tensors
from valuedist.checkpoints.hf import load_hf_dir
from valuedist.checkpoints.tokenizer import load_tokenizer, special_ids
from valuedist.model import params as params_lib
from valuedist.model.config import ModelConfig
from valuedist.parallel import sharding

__all__ = ["Model", "load", "LoadError", "EMBEDDED", "embedded_gguf", "default_cache_dir", "load_hf_dir", "load_gguf",
           "read_gguf_tensors", "load_tokenizer", "save_params", "restore_params"]


@dataclasses.dataclass(frozen=True)
class Model:
  """A loaded checkpoint: `params` (pytree, on the mesh when one was given), its `cfg`, the
  tokenizer and special ids; `aligned` is known for the embedded models only."""
  name: str
  cfg: ModelConfig
  params: Any
  tokenizer: Any
  aligned: Optional[bool]
  bos_id: Optional[int]
  eos_ids: tuple[int, ...]
  pad_id: int
  source: str = ""              # the file or directory the weights came from
  quantization: str = ""        # e.g. 'GGUF Q4_1 (...)'; 'safetensors <dtypes>' for a directory


def load(spec: str, dtype=jnp.float32, cache_dir=None, mesh=None, layout: str = "stacked") -> Model:
  """Loads a model spec (embedded name, HF directory, hub id or .gguf path); see the module
  docstring. dtype: the params' dtype and the compute dtype (matmuls, activations, KV cache;
  norms, softmax and logits stay f32). layout: 'stacked' (blocks on a layer axis, run by a
  scan) or 'unstacked' (one block dict per layer, an unrolled loop): `model.params.LAYOUTS`."""
  if layout not in params_lib.LAYOUTS:
    raise LoadError(f"layout must be one of {params_lib.LAYOUTS}, got {layout!r}")
  cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
  path = Path(spec)
  aligned = None
  if spec in EMBEDDED:
    path, aligned = embedded_gguf(spec, cache_dir), EMBEDDED[spec].aligned
  elif hub.is_hub_id(spec):
    path = hub.resolve(spec)
  elif not path.exists():
    raise LoadError(f"unknown model spec {spec!r}: give an embedded name ({', '.join(EMBEDDED)}), "
                    "a Hugging Face model directory, a hub id (org/name) or a .gguf file")
  if path.is_dir():
    cfg, params = load_hf_dir(path, dtype=dtype)
    tokenizer = load_tokenizer(path)
    quant = "safetensors " + ",".join(sorted({str(x.dtype) for x in jax.tree.leaves(params)}))
    params = (sharding.shard_params(params, mesh, cfg) if mesh is not None
              else jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), params))
  elif path.suffix == ".gguf":
    cfg, params, tokenizer = converted_gguf(path, cache_dir, dtype, mesh)
    quant = quantization(path)
  else:
    raise LoadError(f"model spec {spec!r} is neither a directory nor a .gguf file")
  if dtype is not None:                       # activations and KV cache in the params' dtype too
    cfg = dataclasses.replace(cfg, compute_dtype=jnp.dtype(dtype).name)
  bos, eos, pad = special_ids(tokenizer)
  params = params_lib.with_layout(params, layout)
  return Model(spec, cfg, params, tokenizer, aligned, bos, eos, pad, str(path), quant)
