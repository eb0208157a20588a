"""The conversion cache: GGUF files converted once, params saved with orbax, config as JSON,
tokenizer with save_pretrained, under `default_cache_dir()`; written atomically, a partial
entry is rebuilt."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from valuedist.checkpoints.gguf_files import load_gguf
from valuedist.checkpoints.tokenizer import load_tokenizer
from valuedist.model import params as P
from valuedist.model.config import ModelConfig
from valuedist.parallel import hosts, sharding

CACHE_VERSION = 1


def save_params(path, params) -> None:
  """Saves a params pytree of host arrays with orbax at `path` (which must not exist), from
  this process alone (with several processes, the caller is process 0 and the others wait)."""
  import orbax.checkpoint as ocp
  alone = ocp.options.MultiprocessingOptions(primary_host=jax.process_index(), active_processes={jax.process_index()})
  ckptr = ocp.StandardCheckpointer(multiprocessing_options=alone)
  ckptr.save(Path(path).absolute(), jax.tree.map(np.asarray, params))      # lazy leaves are read here
  ckptr.wait_until_finished()


def restore_params(path, abstract, shardings=None):
  """Restores params saved by `save_params`. abstract: pytree of jax.ShapeDtypeStruct (or arrays);
  shardings: matching pytree of shardings (default: the first device)."""
  import orbax.checkpoint as ocp
  if shardings is None:
    shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), abstract)
  target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
  return ocp.StandardCheckpointer().restore(Path(path).absolute(), target)


def _abstract_params(cfg: ModelConfig, dtype) -> dict:
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s, dtype), P.param_shapes(cfg), is_leaf=P._is_shape)


def default_cache_dir() -> Path:
  return Path(os.environ.get("VALUEDIST_CACHE", Path.home() / ".cache" / "valuedist"))


def _cache_key(path: Path) -> str:
  st = path.stat()
  return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CACHE_VERSION}".encode()).hexdigest()[:16]


def converted_gguf(path: Path, cache_dir: Path, dtype, mesh):
  """(cfg, params, tokenizer) of a GGUF file, converting into the cache on first use; params
  are restored onto `mesh` (Megatron-style specs) when one is given. With several processes
  process 0 converts (the cache folder must be one all processes see), the others wait at a
  barrier, then every process restores its own shards."""
  import transformers
  entry = cache_dir / "converted" / f"{path.stem}-{_cache_key(path)}"
  if hosts.agree(not (entry / "done.json").exists()):
    if hosts.is_writer():
      _convert(path, entry)
    hosts.barrier(f"converted {entry.name}")
  d = json.loads((entry / "config.json").read_text())
  cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
  shardings = None
  if mesh is not None:
    shardings = sharding.param_shardings(_abstract_params(cfg, np.float32), mesh, cfg)
  params = restore_params(entry / "params", _abstract_params(cfg, np.float32), shardings)
  if mesh is not None:
    params = sharding.pad_vocab(params, mesh.shape[sharding.MODEL])
  if dtype is not None and jnp.dtype(dtype) != jnp.float32:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  return cfg, params, transformers.AutoTokenizer.from_pretrained(str(entry / "tokenizer"))


def _convert(path: Path, entry: Path) -> None:
  """Dequantizes a GGUF file into cache entry `entry` (written under a temp name, renamed when
  complete; a partial entry from an interrupted run is rebuilt). Says what it is doing."""
  start = time.monotonic()
  print(f"valuedist: converting {path.name} into the cache {entry} (once; about a minute per 100M parameters)",
        file=sys.stderr, flush=True)
  if entry.exists():
    shutil.rmtree(entry)
  tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
  shutil.rmtree(tmp, ignore_errors=True)
  cfg, params = load_gguf(path, dtype=np.float32, progress=f"valuedist: dequantizing {path.name}")
  print(f"valuedist: {path.name} dequantized ({sum(x.size for x in jax.tree.leaves(params)) / 1e6:.0f}M parameters, "
        f"{time.monotonic() - start:.0f} s); building its tokenizer from the GGUF vocabulary (transformers; "
        "the slow part for large vocabularies)", file=sys.stderr, flush=True)
  tokenizer = load_tokenizer(path)
  print(f"valuedist: {path.name} tokenizer built ({time.monotonic() - start:.0f} s); saving", file=sys.stderr, flush=True)
  tmp.mkdir(parents=True)
  save_params(tmp / "params", params)
  (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
  tokenizer.save_pretrained(str(tmp / "tokenizer"))
  (tmp / "done.json").write_text(json.dumps({"source": str(path), "version": CACHE_VERSION}))
  os.replace(tmp, entry)
  print(f"valuedist: {path.name} converted in {time.monotonic() - start:.0f} s", file=sys.stderr, flush=True)
