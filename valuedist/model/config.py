"""The one shared transformer description every supported family is converted into.

`ModelConfig` is frozen and hashable: it is passed to jitted functions as a static
argument, so everything in it is architecture, never data.
"""
from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of a decoder-only transformer.

  Shapes in the rest of the library use: V vocab, D d_model, L n_layers, H n_heads,
  K n_kv_heads, Dh head_dim, F d_ff, B batch, T query length, S cache length.
  """
  family: str
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  d_ff: int
  max_positions: int
  norm: str = "rms"                 # "rms" or "layer"
  norm_eps: float = 1e-6
  norm_offset: float = 0.0          # 1.0 for Gemma: scale is (1 + w)
  embed_scale: float = 1.0          # sqrt(D) for Gemma
  activation: str = "silu"          # "silu", "gelu_tanh" or "gelu"
  gated_mlp: bool = True
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False             # Gemma 3: RMSNorm over Dh on q and k
  post_norms: bool = False          # Gemma 2/3: norms after attention and MLP
  attn_scale: float = 0.0           # multiplies q.k; 0 means Dh ** -0.5
  attn_softcap: Optional[float] = None
  final_softcap: Optional[float] = None
  learned_positions: bool = False   # GPT-2: absolute position table, no RoPE
  inv_freq: tuple[float, ...] = ()          # RoPE inverse frequencies, global layers
  inv_freq_local: tuple[float, ...] = ()    # RoPE inverse frequencies, sliding layers
  rope_factor: float = 1.0          # attention factor applied to cos/sin
  sliding_window: Optional[int] = None
  layer_sliding: tuple[bool, ...] = ()      # per layer: sliding-window attention
  tie_embeddings: bool = True
  compute_dtype: str = "float32"    # matmul dtype; norms, softmax, logits stay f32

  def __post_init__(self):
    if self.norm not in ("rms", "layer"):
      raise ValueError(f"norm must be 'rms' or 'layer', got {self.norm!r}")
    if self.activation not in ("silu", "gelu_tanh", "gelu"):
      raise ValueError(f"activation must be silu, gelu_tanh or gelu, got {self.activation!r}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
    if self.layer_sliding and len(self.layer_sliding) != self.n_layers:
      raise ValueError("layer_sliding needs one entry per layer")

  @property
  def scale(self) -> float:
    return self.attn_scale or self.head_dim ** -0.5

  @property
  def any_sliding(self) -> bool:
    return self.sliding_window is not None and any(self.layer_sliding)

  def replace(self, **kw) -> "ModelConfig":
    return dataclasses.replace(self, **kw)
