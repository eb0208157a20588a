"""Logical mesh axes of the model's programs and the sharding constraints that name them.

valuedist's meshes have two axes, `data` (the batch) and `model` (heads, MLP columns,
vocabulary); `parallel.sharding` builds them and places parameters. The model code itself
knows no mesh: it pins the layout of the arrays it creates (the KV cache) and of the residual
stream with `constrain`, which applies when the caller traces under `jax.set_mesh(mesh)` (the
studies do) and is a no-op otherwise, so the same function runs on one device or a pod.
"""
from __future__ import annotations

from typing import Optional

import jax
from jax.sharding import PartitionSpec

DATA, MODEL = "data", "model"


def constrain(x: jax.Array, *axes: Optional[str]) -> jax.Array:
  """x with a sharding constraint naming a mesh axis (or None) per dimension, under the mesh
  set by `jax.set_mesh`. An axis the mesh lacks, or whose size does not divide its dimension
  (one KV head on a model axis of 4, an odd batch), is left unsplit there, and so is a manual
  axis (inside `shard_map` over it, x is one shard's value). No mesh: x."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  manual = set(mesh.manual_axes)          # inside shard_map over them: the value is already per shard
  sizes = {a: n for a, n in zip(mesh.axis_names, mesh.axis_sizes) if a not in manual}
  spec = [a if a in sizes and n % sizes[a] == 0 else None for a, n in zip(axes, x.shape)]
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))
