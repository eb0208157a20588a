"""Hugging Face config -> `ModelConfig`, one small builder per family.

Every supported family is described by the one shared `ModelConfig`; anything a
builder cannot express faithfully is an error naming what is supported.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np

from valuedist.model.config import ModelConfig

ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
               "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}


class UnsupportedModel(ValueError):
  pass


def _get(c, name, default=None):
  v = getattr(c, name, default)
  return default if v is None else v


def _activation(c, *names) -> str:
  for n in names:
    act = getattr(c, n, None)
    if act:
      break
  if act not in ACTIVATIONS:
    raise UnsupportedModel(f"activation {act!r} is not supported; supported: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[act]


def rope_inv_freq(params: dict, head_dim: int) -> tuple[tuple[float, ...], float]:
  """HF rope parameters -> (inverse frequencies [Dh/2] computed in f32 as HF does, attention factor)."""
  rope_type = params.get("rope_type", params.get("type", "default"))
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise UnsupportedModel("partial_rotary_factor != 1 is not supported")
  base = np.float32(params["rope_theta"])
  exps = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv = (np.float32(1.0) / (base ** exps)).astype(np.float32)
  if rope_type == "default":
    pass
  elif rope_type == "linear":
    inv = (inv / np.float32(params["factor"])).astype(np.float32)
  elif rope_type == "llama3":
    factor = params["factor"]
    lo, hi = params["low_freq_factor"], params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    wavelen = np.float32(2 * math.pi) / inv
    scaled = np.where(wavelen > old / lo, inv / np.float32(factor), inv).astype(np.float32)
    smooth = ((old / wavelen - lo) / (hi - lo)).astype(np.float32)
    smoothed = ((1 - smooth) * scaled / np.float32(factor) + smooth * scaled).astype(np.float32)
    medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
    inv = np.where(medium, smoothed, scaled).astype(np.float32)
  else:
    raise UnsupportedModel(f"rope_type {rope_type!r} is not supported; supported: default, linear, llama3")
  return tuple(float(x) for x in inv), 1.0


def _rope_params(c) -> dict:
  rp = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
  rp = dict(rp)
  if "rope_theta" not in rp:
    rp["rope_theta"] = _get(c, "rope_theta", 10000.0)
  return rp


def _layer_sliding(c, n_layers: int, window) -> tuple[bool, ...]:
  types = getattr(c, "layer_types", None)
  if types:
    bad = set(types) - {"full_attention", "sliding_attention"}
    if bad:
      raise UnsupportedModel(f"layer types {sorted(bad)} are not supported; supported: full_attention, sliding_attention")
    return tuple(t == "sliding_attention" for t in types)
  return (window is not None,) * n_layers


def _llama_like(c, family: str) -> ModelConfig:
  d, h = c.hidden_size, c.num_attention_heads
  head_dim = _get(c, "head_dim", d // h)
  attention_bias = bool(_get(c, "attention_bias", False))
  window = _get(c, "sliding_window", None)
  if family == "qwen2" and not _get(c, "use_sliding_window", False):
    window = None
  sliding = _layer_sliding(c, c.num_hidden_layers, window)
  if not any(sliding):
    window = None
  inv, factor = rope_inv_freq(_rope_params(c), head_dim)
  return ModelConfig(
      family=family, vocab_size=c.vocab_size, d_model=d, n_layers=c.num_hidden_layers,
      n_heads=h, n_kv_heads=_get(c, "num_key_value_heads", h), head_dim=head_dim,
      d_ff=c.intermediate_size, max_positions=c.max_position_embeddings,
      norm_eps=c.rms_norm_eps, activation=_activation(c, "hidden_act"),
      qkv_bias=attention_bias or family == "qwen2", o_bias=attention_bias and family == "llama",
      mlp_bias=bool(_get(c, "mlp_bias", False)), inv_freq=inv, rope_factor=factor,
      sliding_window=window, layer_sliding=sliding if window else (),
      tie_embeddings=bool(_get(c, "tie_word_embeddings", False)))


def _gemma(c, family: str) -> ModelConfig:
  if getattr(c, "text_config", None) is not None:   # multimodal Gemma 3 wrapper
    c = c.text_config
  if _get(c, "use_bidirectional_attention", False):
    raise UnsupportedModel("bidirectional Gemma attention is not supported (decoder-only models only)")
  d = c.hidden_size
  head_dim = c.head_dim
  rp = _rope_params(c)
  if family == "gemma3":
    inv, factor = rope_inv_freq(dict(rp["full_attention"]), head_dim)
    inv_local, _ = rope_inv_freq(dict(rp["sliding_attention"]), head_dim)
  else:
    inv, factor = rope_inv_freq(rp, head_dim)
    inv_local = ()
  window = _get(c, "sliding_window", None) if family != "gemma" else None
  sliding = _layer_sliding(c, c.num_hidden_layers, window) if window else ()
  return ModelConfig(
      family=family, vocab_size=c.vocab_size, d_model=d, n_layers=c.num_hidden_layers,
      n_heads=c.num_attention_heads, n_kv_heads=c.num_key_value_heads, head_dim=head_dim,
      d_ff=c.intermediate_size, max_positions=c.max_position_embeddings,
      norm_eps=c.rms_norm_eps, norm_offset=1.0, embed_scale=float(np.float32(d ** 0.5)),
      activation=_activation(c, "hidden_activation", "hidden_act"),
      qkv_bias=bool(_get(c, "attention_bias", False)), o_bias=bool(_get(c, "attention_bias", False)),
      qk_norm=family == "gemma3", post_norms=family in ("gemma2", "gemma3"),
      attn_scale=(_get(c, "query_pre_attn_scalar", head_dim) ** -0.5) if family != "gemma" else 0.0,
      attn_softcap=_get(c, "attn_logit_softcapping", None) if family != "gemma" else None,
      final_softcap=_get(c, "final_logit_softcapping", None) if family != "gemma" else None,
      inv_freq=inv, inv_freq_local=inv_local, rope_factor=factor,
      sliding_window=window if sliding and any(sliding) else None,
      layer_sliding=sliding if sliding and any(sliding) else (),
      tie_embeddings=bool(_get(c, "tie_word_embeddings", True)))


def _gpt2(c, family: str) -> ModelConfig:
  for opt in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn"):
    if getattr(c, opt, False):
      raise UnsupportedModel(f"GPT-2 option {opt}=True is not supported")
  if not getattr(c, "scale_attn_weights", True):
    raise UnsupportedModel("GPT-2 option scale_attn_weights=False is not supported")
  d, h = c.n_embd, c.n_head
  return ModelConfig(
      family=family, vocab_size=c.vocab_size, d_model=d, n_layers=c.n_layer, n_heads=h,
      n_kv_heads=h, head_dim=d // h, d_ff=_get(c, "n_inner", 4 * d), max_positions=c.n_positions,
      norm="layer", norm_eps=c.layer_norm_epsilon, activation=_activation(c, "activation_function"),
      gated_mlp=False, qkv_bias=True, o_bias=True, mlp_bias=True, learned_positions=True,
      tie_embeddings=True)


BUILDERS: dict[str, Callable[[Any, str], ModelConfig]] = {
    "llama": _llama_like, "mistral": _llama_like, "qwen2": _llama_like,
    "gemma": _gemma, "gemma2": _gemma, "gemma3": _gemma, "gemma3_text": _gemma,
    "gpt2": _gpt2,
}
FAMILY_OF = {"gemma3_text": "gemma3"}


def config_from_hf(hf_config) -> ModelConfig:
  """A transformers `PretrainedConfig` (or a dict of its fields) -> ModelConfig."""
  if isinstance(hf_config, dict):
    import transformers
    hf_config = transformers.AutoConfig.for_model(**hf_config)
  mt = hf_config.model_type
  if mt not in BUILDERS:
    raise UnsupportedModel(f"architecture {mt!r} is not supported; supported: {', '.join(sorted(BUILDERS))}")
  return BUILDERS[mt](hf_config, FAMILY_OF.get(mt, mt))
