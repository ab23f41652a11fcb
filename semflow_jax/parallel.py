"""The device mesh and how arrays are laid out on it.

Axes: `data` (batch) and `fsdp` (batch too, and the axis parameters may be sharded over).
Batches are global arrays built from each process's local slice.
"""

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")


def make_mesh(config: ml_collections.ConfigDict) -> Mesh:
  """Mesh of all devices shaped (data, fsdp) from config.mesh; a -1 takes what is left."""
  devices = jax.devices()
  data, fsdp = config.mesh.data, config.mesh.fsdp
  if (data == -1) + (fsdp == -1) > 1:
    raise ValueError("config.mesh: at most one of data, fsdp may be -1")
  n = len(devices)
  if data == -1:
    data = n // fsdp
  if fsdp == -1:
    fsdp = n // data
  if data * fsdp != n:
    raise ValueError(f"config.mesh: data={data} x fsdp={fsdp} != {n} devices")
  return Mesh(np.asarray(devices).reshape(data, fsdp), BATCH_AXES)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def batch_size_per_process(global_batch: int, mesh: Mesh) -> int:
  devices = mesh.devices.size
  if global_batch % devices:
    raise ValueError(f"batch size {global_batch} is not divisible by the {devices} devices")
  return global_batch // jax.process_count()


def to_global(batch: dict, mesh: Mesh) -> dict:
  """Per-process numpy batch -> global jax arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, x), batch)
