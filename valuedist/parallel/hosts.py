"""Several processes, one program: start-up, host I/O of global arrays, agreement, writing.

valuedist runs the same Python program on every process of a multi-host slice (JAX's
multi-controller model). Every process holds the same host-side inputs (prompts, configs),
places them on the global mesh with `put_global` (each process fills only its addressable
shards), runs the same jitted programs, and reads per-row results from its own shards
(`owned_rows`, `local_value`; each process reports its own rows) or, for values all of them
need, gathers them with `to_host`. Decisions that
depend on files (which units are done, whether a cache exists) are taken by process 0 and
broadcast with `agree`, so every process runs the same sequence of collective programs; files
are written by process 0 only (`is_writer`), followed by a `barrier`. On one process all of
this reduces to the plain single-process calls.

Shared files (records, caches, converted checkpoints) assume an output and cache folder that
every process sees (NFS, a GCS mount); see the README's multi-host section.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

import jax
import numpy as np

# Environment variables that mark a multi-process cluster jax.distributed.initialize() can
# auto-detect (Cloud TPU pod slices, SLURM, Open MPI); their value is the process count.
_CLUSTER_SIZE_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")


def _in_tpu_pod() -> bool:
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def detected_cluster() -> bool:
  """True when the environment names a multi-process cluster (TPU pod slice, SLURM, MPI)."""
  return _in_tpu_pod() or any(int(os.environ.get(v, "1") or 1) > 1 for v in _CLUSTER_SIZE_VARS)


def initialize(coordinator: str = "", num_processes: int = 0, process_id: int = -1, auto: bool = False) -> bool:
  """Starts jax.distributed: explicitly with a coordinator 'host:port', a process count and
  this process's id (CPU or manual clusters), or with JAX's own cluster detection when `auto`
  or when the environment names a cluster (TPU pod slice, SLURM, MPI). Does nothing on a
  single machine without flags. Returns whether it started. Must run before anything
  touches a device."""
  if coordinator:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f"--coordinator needs --num_processes >= 1 and 0 <= --process_id < num_processes "
                       f"(got {num_processes}, {process_id})")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    return True
  if num_processes > 1 or process_id >= 0:
    raise ValueError("--num_processes/--process_id need --coordinator=HOST:PORT (process 0's address)")
  if auto or detected_cluster():
    jax.distributed.initialize()
    return True
  return False


def multi_process() -> bool:
  return jax.process_count() > 1


def is_writer() -> bool:
  """Whether this process writes shared files (process 0)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process reaches the barrier of this name (no-op on one process)."""
  if multi_process():
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def to_host(x) -> np.ndarray:
  """A jax array (global or local) as a numpy array holding its whole value. A global array
  that spans other processes' devices is gathered (every process receives the value); never
  np.asarray on it. For values every process needs (features a probe or judge is fitted on);
  per-row results are read where they live (`owned_rows`, `local_value`)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def tree_to_host(tree) -> Any:
  """`to_host` over a pytree."""
  return jax.tree.map(to_host, tree)


def owned_rows(sharding: jax.sharding.NamedSharding, n: int) -> np.ndarray:
  """Sorted indices of the rows of an [n, ...] batch placed with `sharding` (leading axis
  split) that this process reports: those of its addressable shards. Each row's replicas (the
  model axis) must sit on one process, as `sharding.make_mesh` keeps them, so every row has one
  owner and host arrays filled only at owned rows place correctly (`put_global`). One process:
  all rows."""
  if not multi_process():
    return np.arange(n)
  one_d = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(sharding.spec[0] if sharding.spec else None))
  holders: dict[tuple, set] = {}
  for device, index in one_d.devices_indices_map((n,)).items():
    holders.setdefault(index[0].indices(n), set()).add(device.process_index)
  mine = []
  for span, procs in holders.items():
    if len(procs) > 1:
      raise ValueError(f"rows {span[0]}..{span[1] - 1} are held by processes {sorted(procs)}: keep the model axis "
                       "within a host (sharding.make_mesh does)")
    if jax.process_index() in procs:
      mine.extend(range(*span))
  return np.asarray(sorted(mine), dtype=np.int64)


def local_value(x, rows: np.ndarray, axis: int = 0) -> np.ndarray:
  """x's value (a jax array, global or local) at `rows` along `axis`, in full shape: the rows
  named are read from this process's addressable shards (no collective, nothing gathered),
  every other row is zero. `rows` are this process's `owned_rows`; reading a row no addressable
  shard holds is an error."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(x)
  out = np.zeros(x.shape, x.dtype)
  want = np.zeros(x.shape[axis], bool)
  want[rows] = True
  got = np.zeros(x.shape[axis], bool)
  for s in x.addressable_shards:
    span = np.arange(x.shape[axis])[s.index[axis]]
    take = want[span]
    if not take.any():
      continue
    index = list(s.index)
    index[axis] = span[take]
    out[tuple(index)] = np.take(np.asarray(s.data), np.flatnonzero(take), axis=axis)
    got[span[take]] = True
  if not got[rows].all():
    raise ValueError(f"rows {np.flatnonzero(want & ~got).tolist()} of an array sharded {x.sharding} are not held "
                     f"by process {jax.process_index()}; read only its owned_rows")
  return out


def host_chunks(x, max_bytes: int = 64 << 20) -> Iterator[np.ndarray]:
  """x's value (a numpy or jax array, global or local) as consecutive numpy chunks along its
  leading axis, in C order, each about `max_bytes` (at least one row): a global array that
  spans other processes' devices is gathered one chunk at a time (every process receives each
  chunk), so no host ever holds more than a chunk of it. A local array: one chunk."""
  if not isinstance(x, jax.Array) or x.is_fully_addressable or x.ndim == 0:
    yield to_host(x)
    return
  per_row = max(1, x.dtype.itemsize * int(np.prod(x.shape[1:])))
  rows = max(1, max_bytes // per_row)
  for start in range(0, x.shape[0], rows):
    yield to_host(jax.lax.slice_in_dim(x, start, min(start + rows, x.shape[0]), axis=0))


def put_global(x, sharding: jax.sharding.Sharding) -> jax.Array:
  """The host array x (the same on every process) as a global array with `sharding`: each
  process builds only its addressable shards from its copy, nothing passes through one device.
  x may be lazy (x[index] reads a slice, e.g. a safetensors tensor): then each distinct shard
  is read once, and nothing else."""
  if isinstance(x, jax.Array) or not hasattr(x, "__getitem__"):
    x = np.asarray(x)
  read: dict = {}                         # a shard's replicas (other data-axis devices) reuse one read

  def shard(index):
    key = repr(index)
    if key not in read:
      read[key] = np.asarray(x[index])
    return read[key]
  return jax.make_array_from_callback(tuple(x.shape), sharding, shard)


def agree(value: Any) -> Any:
  """Process 0's value of a JSON-able `value`, on every process (no-op on one process). Used
  for decisions read from files (done units, cache hits) so that all processes run the same
  programs even when their views of the files differ."""
  if not multi_process():
    return value
  from jax.experimental import multihost_utils
  data = np.frombuffer(json.dumps(value, sort_keys=True).encode(), np.uint8) if is_writer() else np.zeros(0, np.uint8)
  n = int(multihost_utils.broadcast_one_to_all(np.asarray(len(data), np.int64)))
  buf = np.zeros(n, np.uint8)
  buf[:len(data)] = data[:n]
  buf = np.asarray(multihost_utils.broadcast_one_to_all(buf))
  return json.loads(buf.tobytes().decode())


def process_summary(prefix: Optional[str] = None) -> str:
  """'process i of n, L local of G devices' (for logs)."""
  s = f"process {jax.process_index()} of {jax.process_count()}, {jax.local_device_count()} local of {jax.device_count()} devices"
  return f"{prefix}: {s}" if prefix else s


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
  """Writes a whole file or nothing (temp file in the same folder, then rename), mode 0644.
  Process 0 writes; every process then waits at a barrier, so the file exists for all of
  them when the call returns (one shared folder)."""
  if is_writer():
    _write_file(Path(path), data)
  barrier(f"atomic_write:{Path(path).name}")


def _write_file(path: Path, data: str | bytes) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix="." + path.name)
  with os.fdopen(fd, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
  os.chmod(tmp, 0o644)            # mkstemp creates 0600; results are meant to be shared
  os.replace(tmp, path)
