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

DATA, MODEL = "data", "model"


def make_mesh(data: Optional[int] = None, model: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Mesh of shape (data, model); `data` defaults to all remaining devices."""
  devices = list(devices if devices is not None else jax.devices())
  if data is None:
    data = len(devices) // model
  if data * model > len(devices) or data < 1 or model < 1:
    raise ValueError(f"a mesh of data={data} x model={model} needs {data * model} devices; "
                     f"{len(devices)} are available (set XLA_FLAGS=--xla_force_host_platform_device_count=N on CPU)")
  return Mesh(np.asarray(devices[:data * model]).reshape(data, model), (DATA, MODEL))


# Which axis of each stacked kernel is split across `model` (None = replicated).
_MODEL_AXIS = {"q": 2, "k": 2, "v": 2, "gate": 2, "up": 2, "o": 1, "down": 1}


def param_spec(path: tuple, shape: tuple, model_size: int) -> P:
  """PartitionSpec for one params leaf, given its path and shape."""
  names = [getattr(k, "key", str(k)) for k in path]
  axis = None
  if names[-1] == "kernel" and len(names) >= 2 and names[-2] in _MODEL_AXIS and len(shape) == 3:
    axis = _MODEL_AXIS[names[-2]]
  elif names[-2:] == ["embed", "embedding"]:
    axis = 0
  elif names[-2:] == ["unembed", "kernel"]:
    axis = 1
  if axis is None or model_size == 1 or shape[axis] % model_size:
    return P()
  spec = [None] * len(shape)
  spec[axis] = MODEL
  return P(*spec)


def param_shardings(params, mesh: Mesh):
  """Pytree of NamedShardings for `params` (arrays or ShapeDtypeStructs)."""
  size = mesh.shape[MODEL]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(path, x.shape, size)), params)


def shard_params(params, mesh: Mesh):
  return jax.device_put(params, param_shardings(params, mesh))


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
    return jax.device_put(x, batch_sharding(mesh, x.ndim))
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
