"""The params pytree: its shapes, random init, and conversion from Hugging Face tensor names.

Conversion is a table from HF parameter-name patterns to small transform functions
(MaxText style). Each rule maps one HF tensor to one or more (path, array) entries;
per-layer entries are stacked on a leading layer axis. Values are kept exactly as HF
stores them (no folded scales); Linear weights are transposed to [in, out].
"""
from __future__ import annotations

import functools
import re
from typing import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from valuedist.model.config import ModelConfig


class ConversionError(ValueError):
  pass


# ----------------------------------------------------------------------------- shapes

def param_shapes(cfg: ModelConfig) -> dict:
  """Nested dict of shape tuples, the single description of the params layout."""
  L, D, F, V = cfg.n_layers, cfg.d_model, cfg.d_ff, cfg.vocab_size
  Hd, Kd = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim

  def norm(*lead):
    p = {"scale": (*lead, D)}
    if cfg.norm == "layer":
      p["bias"] = (*lead, D)
    return p

  def dense(i, o, bias):
    p = {"kernel": (L, i, o)}
    if bias:
      p["bias"] = (L, o)
    return p

  attn = {"q": dense(D, Hd, cfg.qkv_bias), "k": dense(D, Kd, cfg.qkv_bias),
          "v": dense(D, Kd, cfg.qkv_bias), "o": dense(Hd, D, cfg.o_bias)}
  if cfg.qk_norm:
    attn["q_norm"] = {"scale": (L, cfg.head_dim)}
    attn["k_norm"] = {"scale": (L, cfg.head_dim)}
  mlp = {"up": dense(D, F, cfg.mlp_bias), "down": dense(F, D, cfg.mlp_bias)}
  if cfg.gated_mlp:
    mlp["gate"] = dense(D, F, cfg.mlp_bias)
  blocks = {"attn_norm": norm(L), "mlp_norm": norm(L), "attn": attn, "mlp": mlp}
  if cfg.post_norms:
    blocks["post_attn_norm"] = norm(L)
    blocks["post_mlp_norm"] = norm(L)
  shapes = {"embed": {"embedding": (V, D)}, "blocks": blocks, "final_norm": norm()}
  if cfg.learned_positions:
    shapes["pos_embed"] = {"embedding": (cfg.max_positions, D)}
  if not cfg.tie_embeddings:
    shapes["unembed"] = {"kernel": (D, V)}
  return shapes


def _is_shape(x):
  return isinstance(x, tuple) and all(isinstance(i, int) for i in x)


def init_params(cfg: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> dict:
  """Random params (normal(std) weights, unit-ish norm scales) for tests and benchmarks."""
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=_is_shape)
  keys = jax.random.split(key, len(leaves))
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(shapes, is_leaf=_is_shape)[0]]
  out = []
  for k, path, shape in zip(keys, paths, leaves):
    name = jax.tree_util.keystr(path)
    if "norm" in name and "scale" in name:
      base = 0.0 if cfg.norm_offset else 1.0
      out.append((base + 0.1 * jax.random.normal(k, shape)).astype(dtype))
    else:
      out.append((std * jax.random.normal(k, shape)).astype(dtype))
  return jax.tree.unflatten(treedef, out)


# ----------------------------------------------------------------------------- HF names

Entry = tuple[tuple[str, ...], "int | None", np.ndarray]
Rule = tuple[str, Callable[[re.Match, np.ndarray, ModelConfig], list[Entry]]]


def _to(path: str, transpose: bool = False):
  """Rule body: put the tensor at `path` ({i} = layer, {0}.. = regex groups), optionally .T."""
  def fn(m, x, cfg):
    groups = m.groups()
    layer = int(groups[0]) if path.startswith("blocks") else None
    rest = groups[1:] if layer is not None else groups
    p = path.format(*rest) if rest else path
    return [(tuple(p.split("/")), layer, x.T if transpose else x)]
  return fn


def _gpt2_split_qkv(kind: str):
  def fn(m, x, cfg):
    layer = int(m.group(1))
    parts = np.split(x, 3, axis=-1)
    return [(("blocks", "attn", n, kind), layer, part) for n, part in zip("qkv", parts)]
  return fn


L = r"(?:model\.)?layers\.(\d+)\."
LLAMA_RULES: list[Rule] = [
    (r"(?:model\.)?embed_tokens\.weight", _to("embed/embedding")),
    (L + r"self_attn\.([qkvo])_proj\.weight", _to("blocks/attn/{0}/kernel", True)),
    (L + r"self_attn\.([qkvo])_proj\.bias", _to("blocks/attn/{0}/bias")),
    (L + r"self_attn\.([qk])_norm\.weight", _to("blocks/attn/{0}_norm/scale")),
    (L + r"mlp\.(gate|up|down)_proj\.weight", _to("blocks/mlp/{0}/kernel", True)),
    (L + r"mlp\.(gate|up|down)_proj\.bias", _to("blocks/mlp/{0}/bias")),
    (L + r"input_layernorm\.weight", _to("blocks/attn_norm/scale")),
    (L + r"post_attention_layernorm\.weight", _to("blocks/mlp_norm/scale")),
    (r"(?:model\.)?norm\.weight", _to("final_norm/scale")),
    (r"lm_head\.weight", _to("unembed/kernel", True)),
]
# Gemma 2/3 put a norm after attention and one before and after the MLP.
GEMMA_POST_NORM_RULES: list[Rule] = [
    (L + r"post_attention_layernorm\.weight", _to("blocks/post_attn_norm/scale")),
    (L + r"pre_feedforward_layernorm\.weight", _to("blocks/mlp_norm/scale")),
    (L + r"post_feedforward_layernorm\.weight", _to("blocks/post_mlp_norm/scale")),
] + [r for r in LLAMA_RULES if "post_attention_layernorm" not in r[0]]
H = r"(?:transformer\.)?h\.(\d+)\."
GPT2_RULES: list[Rule] = [
    (r"(?:transformer\.)?wte\.weight", _to("embed/embedding")),
    (r"(?:transformer\.)?wpe\.weight", _to("pos_embed/embedding")),
    (H + r"ln_1\.(weight|bias)", lambda m, x, c: [(("blocks", "attn_norm", {"weight": "scale"}.get(m.group(2), "bias")), int(m.group(1)), x)]),
    (H + r"ln_2\.(weight|bias)", lambda m, x, c: [(("blocks", "mlp_norm", {"weight": "scale"}.get(m.group(2), "bias")), int(m.group(1)), x)]),
    (H + r"attn\.c_attn\.weight", _gpt2_split_qkv("kernel")),
    (H + r"attn\.c_attn\.bias", _gpt2_split_qkv("bias")),
    (H + r"attn\.c_proj\.weight", _to("blocks/attn/o/kernel")),   # Conv1D is already [in, out]
    (H + r"attn\.c_proj\.bias", _to("blocks/attn/o/bias")),
    (H + r"mlp\.c_fc\.weight", _to("blocks/mlp/up/kernel")),
    (H + r"mlp\.c_fc\.bias", _to("blocks/mlp/up/bias")),
    (H + r"mlp\.c_proj\.weight", _to("blocks/mlp/down/kernel")),
    (H + r"mlp\.c_proj\.bias", _to("blocks/mlp/down/bias")),
    (r"(?:transformer\.)?ln_f\.(weight|bias)", lambda m, x, c: [(("final_norm", {"weight": "scale"}.get(m.group(1), "bias")), None, x)]),
    (r"lm_head\.weight", _to("unembed/kernel", True)),
]
RULES: dict[str, list[Rule]] = {
    "llama": LLAMA_RULES, "mistral": LLAMA_RULES, "qwen2": LLAMA_RULES, "gemma": LLAMA_RULES,
    "gemma2": GEMMA_POST_NORM_RULES, "gemma3": GEMMA_POST_NORM_RULES, "gpt2": GPT2_RULES,
}
# Buffers some checkpoints carry that are not parameters.
IGNORED = re.compile(r".*\.(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")


def convert(tensors: Iterable[tuple[str, np.ndarray]], cfg: ModelConfig, dtype=None) -> dict:
  """(HF name, array) pairs -> params pytree, checked against `param_shapes(cfg)`.

  Raises ConversionError naming the tensor on an unknown name, a wrong shape, or a missing tensor.
  dtype: cast every array to it (default: keep each tensor's own dtype).
  """
  rules = [(re.compile(p + r"$"), fn) for p, fn in RULES[cfg.family]]
  shapes = param_shapes(cfg)
  flat: dict[tuple[str, ...], dict] = {}
  for name, x in tensors:
    if IGNORED.match(name):
      continue
    for pat, fn in rules:
      m = pat.match(name)
      if m:
        break
    else:
      raise ConversionError(f"unexpected tensor {name!r} for a {cfg.family} model; is the checkpoint of another architecture?")
    for path, layer, arr in fn(m, x if is_lazy(x) else np.asarray(x), cfg):
      if path == ("unembed", "kernel") and cfg.tie_embeddings:
        continue
      want = _lookup(shapes, path, name)
      got = tuple(arr.shape)
      want_one = want[1:] if layer is not None else want
      if got != want_one:
        raise ConversionError(f"tensor {name!r} has shape {got}, expected {want_one} from the config")
      if dtype is not None:
        arr = arr.astype(dtype)
      if layer is None:
        flat[path] = arr
      else:
        if not 0 <= layer < cfg.n_layers:
          raise ConversionError(f"tensor {name!r} names layer {layer}, but the config has {cfg.n_layers} layers")
        flat.setdefault(path, {})[layer] = arr
  out: dict = {}
  for path, want in _walk(shapes):
    if path not in flat:
      raise ConversionError(f"missing tensor for {'/'.join(path)} in the checkpoint")
    v = flat[path]
    if isinstance(v, dict):
      missing = [i for i in range(cfg.n_layers) if i not in v]
      if missing:
        raise ConversionError(f"missing tensor for {'/'.join(path)} at layers {missing}")
      v = stack([v[i] for i in range(cfg.n_layers)])
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = v
  return out


def is_lazy(x) -> bool:
  """A lazily read tensor (shape, dtype, x[index] reads a slice; e.g. a safetensors tensor)."""
  return not isinstance(x, np.ndarray) and hasattr(x, "__getitem__") and hasattr(x, "shape") and hasattr(x, "astype")


def full_index(index, ndim: int) -> tuple:
  """A numpy basic index as a tuple with one entry per axis (missing trailing axes: ':')."""
  index = index if isinstance(index, tuple) else (index,)
  return index + (slice(None),) * (ndim - len(index))


class Stacked:
  """Per-layer tensors stacked on a new leading axis, lazily: x[index] reads only the layers
  and the slice asked for (what a device's shard needs); np.asarray(x) reads all of them."""

  def __init__(self, layers: list):
    self.layers = layers
    self.shape = (len(layers),) + tuple(layers[0].shape)
    self.dtype = layers[0].dtype
    self.ndim = len(self.shape)

  def __getitem__(self, index) -> np.ndarray:
    index = full_index(index, self.ndim)
    if isinstance(index[0], (int, np.integer)):
      return np.asarray(self.layers[index[0]][index[1:]])
    parts = [np.asarray(self.layers[i][index[1:]]) for i in range(len(self.layers))[index[0]]]
    return np.stack(parts) if parts else np.asarray(self.layers[0][index[1:]])[None][:0]

  def astype(self, dtype) -> "Stacked":
    return Stacked([l.astype(dtype) for l in self.layers])

  def __array__(self, dtype=None, copy=None):
    x = self[()]
    return x.astype(dtype) if dtype is not None else x


class Padded:
  """x (an array or a lazy tensor) with zeros appended along `axis` up to `size`, lazily:
  x[index] (one slice per axis, as a device's shard asks) reads only the part inside x."""

  def __init__(self, x, axis: int, size: int):
    if size < x.shape[axis]:
      raise ValueError(f"cannot pad axis {axis} of {tuple(x.shape)} down to {size}")
    self.x, self.axis = x, axis
    self.shape = tuple(x.shape[:axis]) + (size,) + tuple(x.shape[axis + 1:])
    self.dtype = x.dtype
    self.ndim = len(self.shape)

  def __getitem__(self, index) -> np.ndarray:
    index = full_index(index, self.ndim)
    if not all(isinstance(i, slice) for i in index):
      raise TypeError(f"Padded tensors read slices only, not {index}")
    start, stop, step = index[self.axis].indices(self.shape[self.axis])
    if step != 1:
      raise TypeError("Padded tensors read contiguous slices only")
    n = self.x.shape[self.axis]
    inside = index[:self.axis] + (slice(min(start, n), min(max(stop, start), n)),) + index[self.axis + 1:]
    part = np.asarray(self.x[inside])
    extra = max(stop, start) - start - part.shape[self.axis]
    widths = [(0, 0)] * self.ndim
    widths[self.axis] = (0, extra)
    return np.pad(part, widths)

  def astype(self, dtype) -> "Padded":
    return Padded(self.x.astype(dtype), self.axis, self.shape[self.axis])

  def __array__(self, dtype=None, copy=None):
    x = self[()]
    return x.astype(dtype) if dtype is not None else x


def stack(layers: list):
  """np.stack of per-layer arrays, or a lazy `Stacked` when they are lazy."""
  return Stacked(layers) if is_lazy(layers[0]) else np.stack(layers)


# ----------------------------------------------------------------------------- layouts
#
# Stacked (the default, "scanned"): params["blocks"] is one dict whose leaves carry a leading
# layer axis [L, ...], run by `lax.scan`: one compiled block whatever the depth.
# Unstacked (the inference layout, "unscanned"): params["blocks"] is a tuple of L per-layer
# dicts, run by an unrolled loop in which every layer reads its own weight buffers, so no
# step copies a layer's slice out of a stack (compile time grows with depth); their dense
# kernels are stored transposed, [out, in], for the decode product (`layers.dense`). Both give the
# same results (tests/test_inference_layout.py); which is faster depends on the machine
# (bench/RESULTS.md).
LAYOUTS = ("stacked", "unstacked")


def layout_of(params: dict) -> str:
  """'stacked' or 'unstacked': how params["blocks"] holds the layers."""
  return "unstacked" if isinstance(params["blocks"], (tuple, list)) else "stacked"


def _transposed(a):
  """A 2-D kernel [I, O] as [O, I], contiguous: on device (keeping its split, transposed) or on the host."""
  return a.T if isinstance(a, jax.Array) else np.ascontiguousarray(np.asarray(a).T)


def _map_kernels(block: dict, fn, old: str, new: str) -> dict:
  """A block dict with every `old` leaf (a dense layer's kernel) replaced by `new` = fn(leaf)."""
  if not isinstance(block, dict):
    return block
  return {(new if k == old else k): (fn(v) if k == old else _map_kernels(v, fn, old, new)) for k, v in block.items()}


def unstack_blocks(params: dict) -> dict:
  """params in the unstacked layout: blocks as a tuple of L dicts (each leaf [L, ...] -> L
  leaves [...]), every dense kernel [I, O] stored transposed as `kernel_t` [O, I] (the weight
  then sits on the left of a decode step's product, which XLA's CPU matmul streams faster:
  `layers.dense`). Device arrays are sliced on device and keep their split on the
  model axis; host arrays stay host-side. No-op when already unstacked."""
  if layout_of(params) == "unstacked":
    return params
  n = jax.tree.leaves(params["blocks"])[0].shape[0]
  layer = lambda i: _map_kernels(jax.tree.map(lambda a: a[i], params["blocks"]), _transposed, "kernel", "kernel_t")
  return {**params, "blocks": tuple(layer(i) for i in range(n))}


def stack_blocks(params: dict) -> dict:
  """params in the stacked layout (undoes `unstack_blocks`; no-op when already stacked)."""
  if layout_of(params) == "stacked":
    return params
  join = lambda *a: jnp.stack(a) if isinstance(a[0], jax.Array) else np.stack([np.asarray(x) for x in a])
  blocks = [_map_kernels(b, _transposed, "kernel_t", "kernel") for b in params["blocks"]]
  return {**params, "blocks": jax.tree.map(join, *blocks)}


def block_leaf(params: dict, *path: str):
  """One block parameter of every layer, [L, ...], in either layout (e.g. 'attn', 'o', 'kernel';
  a kernel always [L, I, O])."""
  get = lambda d, path=path: functools.reduce(lambda node, k: node[k], path, d)
  if layout_of(params) == "stacked":
    return get(params["blocks"])
  if path[-1] == "kernel":                          # stored per layer as kernel_t [O, I]
    return jnp.stack([get(b, path[:-1] + ("kernel_t",)).T for b in params["blocks"]])
  return jnp.stack([get(b) for b in params["blocks"]])


def with_layout(params: dict, layout: str) -> dict:
  """params in `layout` ('stacked' or 'unstacked')."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  return unstack_blocks(params) if layout == "unstacked" else stack_blocks(params)


def _lookup(shapes: dict, path, name) -> tuple:
  node = shapes
  for k in path:
    if not isinstance(node, dict) or k not in node:
      raise ConversionError(f"tensor {name!r} maps to {'/'.join(path)}, which this config does not have")
    node = node[k]
  return node


def _walk(d: dict, prefix=()) -> Iterator[tuple[tuple[str, ...], tuple]]:
  for k, v in d.items():
    if isinstance(v, dict):
      yield from _walk(v, prefix + (k,))
    else:
      yield prefix + (k,), v
