"""The device mesh and how arrays are laid out on it.

Axes: `data` (batch) and `fsdp` (batch too, and the axis parameters and optimiser state are
sharded over). Batches are global arrays built from each process's local slice. The parameter
layout is a rule on shapes, so it applies to any pytree (params, Adam moments, EMA) unchanged:
a tensor with at least `config.mesh.fsdp_min_size` elements is split over `fsdp` along its
largest dimension divisible by the `fsdp` size; everything else is replicated.
"""

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
DEFAULT_FSDP_MIN_SIZE = 2**14  # elements; below this, sharding saves less than it costs


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int) -> tuple:
  """(data, fsdp) from config.mesh for `num_devices` devices; a -1 takes what is left."""
  data, fsdp = config.mesh.data, config.mesh.fsdp
  if (data == -1) + (fsdp == -1) > 1:
    raise ValueError("config.mesh: at most one of data, fsdp may be -1")
  if data == -1:
    data = num_devices // fsdp
  if fsdp == -1:
    fsdp = num_devices // data
  if data < 1 or fsdp < 1 or data * fsdp != num_devices:
    raise ValueError(f"config.mesh: data={config.mesh.data} x fsdp={config.mesh.fsdp} does not "
                     f"fill the {num_devices} devices")
  return data, fsdp


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Mesh of `devices` (default: all, across processes) shaped (data, fsdp) from config.mesh."""
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(config, len(devices))
  # jax.devices() is ordered by process, so each process's devices form a contiguous block of
  # the flattened mesh and hold a contiguous block of the batch: its own slice.
  return Mesh(np.asarray(devices).reshape(shape), BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def fsdp_spec(shape, fsdp_size: int, min_size: int) -> P:
  """The rule: split the largest dimension divisible by `fsdp_size`; small tensors replicated."""
  if fsdp_size == 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  divisible = [(d, i) for i, d in enumerate(shape) if d % fsdp_size == 0]
  if not divisible:
    return P()
  _, axis = max(divisible)  # ties: the later dimension (output channels of a kernel)
  return P(*([None] * axis + ["fsdp"]))


def state_shardings(tree, mesh: Mesh, config: ml_collections.ConfigDict):
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs (the train state, any part)."""
  fsdp_size = mesh.shape["fsdp"]
  min_size = config.mesh.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)),
                      tree)


def bytes_per_device(tree, shardings) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `shardings`."""
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shard = s.shard_shape(x.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def batch_size_per_process(global_batch: int, mesh: Mesh, micro_batches: int = 1) -> int:
  devices = mesh.devices.size
  if global_batch % (devices * micro_batches):
    raise ValueError(f"config.train.batch_size={global_batch} is not divisible by the {devices} "
                     f"devices x config.train.grad_accum_steps={micro_batches}")
  return global_batch // jax.process_count()


def to_global(batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy batch -> global jax arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
