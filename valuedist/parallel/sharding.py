"""Device mesh and placement: one program for one CPU, one GPU or a pod.

The mesh has two named axes: `data` (the batch is split across it) and `model` (large
weight matrices are split across it, Megatron style: column-parallel q/k/v/gate/up,
row-parallel o/down, vocab-parallel embedding). jit follows these shardings (GSPMD);
nothing here uses pmap.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from valuedist.model import params as params_lib
from valuedist.model.batching import round_up
from valuedist.model.partition import DATA, MODEL
from valuedist.parallel import hosts


def make_mesh(data: Optional[int] = None, model: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Mesh of shape (data, model); `data` defaults to all remaining devices. With several
  processes the mesh spans every process's devices and the model axis stays within a host
  (its collectives run every layer; the data axis only meets at the end)."""
  devices = list(devices if devices is not None else jax.devices())
  if model > len(devices):
    raise ValueError(f"mesh.model={model} needs at least {model} devices; {len(devices)} are available "
                     "(set XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU)")
  if data is None or data == 0:
    data = len(devices) // max(model, 1)
  if data * model > len(devices) or data < 1 or model < 1:
    raise ValueError(f"a mesh of data={data} x model={model} needs {data * model} devices; "
                     f"{len(devices)} are available (set XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU)")
  if jax.process_count() > 1:
    if data * model != len(devices):
      raise ValueError(f"a multi-process mesh must use every device: data={data} x model={model} != "
                       f"{len(devices)} devices; set mesh.data=0 (all) or a matching size")
    if jax.local_device_count() % model:
      raise ValueError(f"mesh.model={model} does not divide the {jax.local_device_count()} devices of a host; "
                       "the model axis must stay within a host")
    auto = (jax.sharding.AxisType.Auto,) * 2               # GSPMD propagation, like the single-process Mesh
    return jax.make_mesh((data, model), (DATA, MODEL), axis_types=auto, devices=devices)
  return Mesh(np.asarray(devices[:data * model]).reshape(data, model), (DATA, MODEL))


def mesh_from_config(c) -> Mesh:
  """The mesh of a study config: `c.mesh.data` x `c.mesh.model` (data 0 = every device left)."""
  return make_mesh(c.mesh.data or None, c.mesh.model)


# Which axis of each stacked kernel is split across `model` (None = replicated).
_MODEL_AXIS = {"q": 2, "k": 2, "v": 2, "gate": 2, "up": 2, "o": 1, "down": 1}
# The attention kernels' split axis is heads x head_dim flattened: split only whole heads.
_HEADS = {"q": "n_heads", "o": "n_heads", "k": "n_kv_heads", "v": "n_kv_heads"}


def param_spec(path: tuple, shape: tuple, model_size: int, cfg=None) -> P:
  """PartitionSpec for one params leaf, given its path and shape. Megatron style: q/k/v/gate/up
  column-parallel, o/down row-parallel, embedding and unembedding vocab-parallel. With `cfg`
  (a ModelConfig) the attention kernels are split by whole heads: q/o only when the model
  axis divides n_heads, k/v only when it divides n_kv_heads (else replicated, as MaxText
  does for few KV heads), so no head is cut across devices. A dimension the model axis does
  not divide is replicated; the loaders pad the vocabulary first (`pad_vocab`), so that is
  never the embedding. Per-layer kernels of unstacked params (`params.unstack_blocks`) split
  the same axis without the layer axis (of their [O, I] `kernel_t`, the other one)."""
  names = [getattr(k, "key", str(k)) for k in path]
  axis = None
  per_layer = any(isinstance(k, jax.tree_util.SequenceKey) for k in path)   # unstacked blocks: no layer axis
  if names[-1] in ("kernel", "kernel_t") and len(names) >= 2 and names[-2] in _MODEL_AXIS and len(shape) == 3 - per_layer:
    axis = _MODEL_AXIS[names[-2]] - per_layer
    if names[-1] == "kernel_t":                         # [O, I]: the transposed per-layer kernel
      axis = 1 - axis
    if cfg is not None and names[-2] in _HEADS and getattr(cfg, _HEADS[names[-2]]) % model_size:
      axis = None
  elif names[-2:] == ["embed", "embedding"]:
    axis = 0
  elif names[-2:] == ["unembed", "kernel"]:
    axis = 1
  if axis is None or model_size == 1 or shape[axis] % model_size:
    return P()
  spec = [None] * len(shape)
  spec[axis] = MODEL
  return P(*spec)


# The vocabulary axis of the embedding [V, D] and the unembedding [D, V].
_VOCAB_AXIS = {("embed", "embedding"): 0, ("unembed", "kernel"): 1}


def _vocab_axis(path) -> Optional[int]:
  return _VOCAB_AXIS.get(tuple(getattr(k, "key", str(k)) for k in path)[-2:])


def pad_vocab(params, model_size: int):
  """params whose vocabulary axis (embedding rows, unembedding columns) is zero-padded to a
  multiple of `model_size`, so the model axis splits it instead of replicating it on every
  device. The model masks the padded logits and the gap leaves them out of its vocabulary
  moments (`transformer.logits_from_normed`, `values.gap`); cfg.vocab_size stays the real size,
  ids never reach the padding. Host leaves stay host-side (lazy: `params.Padded`); device
  arrays are padded by a jitted program onto the padded leaf's sharding. No-op when the model
  axis already divides the vocabulary."""
  def pad(path, x):
    axis = _vocab_axis(path)
    if axis is None or x.shape[axis] % model_size == 0:
      return x
    size = round_up(x.shape[axis], model_size)          # GPT-2's 50257 on 4 devices: 50260
    if not isinstance(x, jax.Array):
      return params_lib.Padded(x, axis, size)
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    shape = x.shape[:axis] + (size,) + x.shape[axis + 1:]
    mesh = getattr(x.sharding, "mesh", None)
    out = None if mesh is None else NamedSharding(mesh, param_spec(path, shape, model_size))
    return jax.jit(lambda a: jax.numpy.pad(a, widths), out_shardings=out)(x)
  return jax.tree_util.tree_map_with_path(pad, params)


def unpad_vocab(params, vocab: int):
  """params with the vocabulary axis cut back to `vocab` (undoes `pad_vocab`; a sliced copy
  of a padded leaf, the others as they are): the model's own values, whatever its layout."""
  def cut(path, x):
    axis = _vocab_axis(path)
    if axis is None or x.shape[axis] == vocab:
      return x
    return jax.lax.slice_in_dim(x, 0, vocab, axis=axis) if isinstance(x, jax.Array) else np.asarray(x).take(
        np.arange(vocab), axis)
  return jax.tree_util.tree_map_with_path(cut, params)


def param_shardings(params, mesh: Mesh, cfg=None):
  """Pytree of NamedShardings for `params` (arrays or ShapeDtypeStructs); see `param_spec`."""
  size = mesh.shape[MODEL]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(path, x.shape, size, cfg)), params)


def shard_params(params, mesh: Mesh, cfg=None):
  """Host (numpy or lazy) params placed on the mesh, the vocabulary padded to a multiple of the
  model axis (`pad_vocab`): each process builds only its own shards."""
  params = pad_vocab(params, mesh.shape[MODEL])
  return jax.tree.map(hosts.put_global, params, param_shardings(params, mesh, cfg))


def batch_sharding(mesh: Mesh, ndim: int = 2) -> NamedSharding:
  """Leading (batch) axis split across `data`, the rest replicated."""
  return NamedSharding(mesh, P(DATA, *([None] * (ndim - 1))))


def shard_batch(arrays, mesh: Mesh):
  """Places every array of a pytree with its batch axis split across `data`.
  The batch size must be a multiple of the data axis (see `pad_batch`)."""
  n = mesh.shape[DATA]
  def put(x):
    if x.shape[0] % n:
      raise ValueError(f"batch of {x.shape[0]} does not split across {n} data devices; pad it with pad_batch")
    return hosts.put_global(x, batch_sharding(mesh, x.ndim))
  return jax.tree.map(put, arrays)


def pad_batch(arrays, multiple: int):
  """Pads the leading axis of every array with zero rows up to a multiple; returns (arrays, n_real)."""
  leaves = jax.tree.leaves(arrays)
  n = leaves[0].shape[0]
  extra = (-n) % multiple
  if not extra:
    return arrays, n
  pad = lambda x: np.concatenate([np.asarray(x), np.zeros((extra,) + x.shape[1:], np.asarray(x).dtype)])
  return jax.tree.map(pad, arrays), n
