"""GGUF files (llama and gemma3 architectures): tensors dequantized with `gguf`, renamed to
Hugging Face names by a table, with the per-architecture fixes transformers applies, then
converted by the name table in `model.params`."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from valuedist.checkpoints.errors import LoadError, one_line as _one_line
from valuedist.model import families, params as P
from valuedist.model.config import ModelConfig

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


def read_gguf_tensors(path, progress: str | None = None) -> Iterator[tuple[str, str, np.ndarray]]:
  """(GGUF name, quantization type name, dequantized f32 array) for every tensor of a file;
  with `progress`, a bar of that name (tensors, rate, ETA) on stderr."""
  import gguf
  from tqdm.auto import tqdm
  path = Path(path)
  if not path.exists():
    raise LoadError(f"{path}: no such file")
  try:
    reader = gguf.GGUFReader(str(path))
  except Exception as e:
    raise LoadError(f"{path}: cannot read GGUF ({_one_line(e)}); the file is truncated, corrupt or uses an "
                    "unknown quantization type") from None
  for t in tqdm(reader.tensors, desc=progress, unit="tensor", disable=progress is None, mininterval=2.0):
    try:
      x = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
      raise LoadError(f"{path}: tensor {t.name} uses quantization type {t.tensor_type.name}, which gguf cannot "
                      "dequantize; requantize the file to F16/Q8_0/Q4_K/Q6_K") from None
    except Exception as e:
      raise LoadError(f"{path}: tensor {t.name} could not be read ({_one_line(e)}); the file is truncated or corrupt") from None
    yield t.name, t.tensor_type.name, np.asarray(x, np.float32)


def _gguf_to_hf_names(path, arch: str, hf_config, progress: str | None = None) -> Iterator[tuple[str, np.ndarray]]:
  table = [(re.compile(p + "$"), hf) for p, hf in GGUF_NAMES[arch].items()]
  fixes = [(re.compile(p + "$"), fn) for (a, p), fn in GGUF_FIXES.items() if a == arch]
  for name, _, x in read_gguf_tensors(path, progress):
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


def load_gguf(path, dtype=None, progress: str | None = None) -> tuple[ModelConfig, dict]:
  """A GGUF file -> (cfg, params), dequantized to f32 (then cast to dtype if given); with
  `progress`, a bar of that name over its tensors."""
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
  return cfg, P.convert(_gguf_to_hf_names(path, arch, hf, progress), cfg, dtype=dtype)


def quantization(path) -> str:
  """The tensor types of a GGUF file by frequency, e.g. 'GGUF Q4_1 (182), F32 (61), Q8_0 (1)'."""
  import gguf
  types: dict[str, int] = {}
  for t in gguf.GGUFReader(str(path)).tensors:
    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
  return "GGUF " + ", ".join(f"{k} ({v})" for k, v in sorted(types.items(), key=lambda kv: -kv[1]))
