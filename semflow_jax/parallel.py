"""The device mesh and how arrays are laid out on it.

Axes: `data` (batch) and `fsdp` (batch too, and the axis parameters and optimiser state are
sharded over). The mesh is built as MaxText and maxdiffusion build theirs
(`jax.experimental.mesh_utils`): `config.mesh.data` x `config.mesh.fsdp` devices inside each
slice (ICI), and `config.mesh.dcn_data` slices (DCN) multiplying the `data` axis, so FSDP's
all-gathers and reduce-scatters stay on a slice's interconnect and only the data-parallel
gradient all-reduce crosses the data-centre network. A -1 takes what is left (of a slice's
devices for `data` / `fsdp`, of the slices for `dcn_data`). Devices without a `slice_index`
(CPUs, GPUs) are one slice.

Batches are global arrays built from each process's local slice. The parameter layout is a rule
on shapes, so it applies to any pytree (params, Adam moments, EMA, gradients) unchanged: a tensor
with at least `config.mesh.fsdp_min_size` elements is split over `fsdp` along its largest
dimension divisible by the `fsdp` size; everything else is replicated (a warning names the large
tensors that stay replicated because no dimension divides). With `config.mesh.shard_params=False`
the model's parameters themselves stay whole on every device (`param_shardings`) while the
optimiser state, the EMA and the gradients keep the rule (ZeRO-style): the forward and backward
are then plain data parallelism, with no per-layer all-gather, and the update gathers the new
parameters once per step.
"""

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")
DEFAULT_FSDP_MIN_SIZE = 2**14  # elements; below this, sharding saves less than it costs


def _fill(sizes: dict, total: int, what: str) -> dict:
  """Resolve at most one -1 in {config key: size} so the sizes multiply to `total`."""
  free = [k for k, v in sizes.items() if v == -1]
  if len(free) > 1:
    raise ValueError(f"config.mesh: at most one of {', '.join(sizes)} may be -1")
  known = int(np.prod([v for v in sizes.values() if v != -1]))
  if free and known > 0 and total % known == 0:
    sizes = {**sizes, free[0]: total // known}
  if any(v < 1 for v in sizes.values()) or int(np.prod(list(sizes.values()))) != total:
    given = " x ".join(f"{k}={v}" for k, v in sizes.items())
    raise ValueError(f"config.mesh: {given} does not fill the {total} {what}")
  return sizes


def num_slices(devices) -> int:
  """Slices (TPU pods joined over the data-centre network) the devices belong to."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def mesh_shape(config: ml_collections.ConfigDict, num_devices: int, slices: int = 1) -> dict:
  """{'dcn_data', 'data', 'fsdp'} from config.mesh for `num_devices` devices in `slices` slices;
  `data` and `fsdp` count devices per slice."""
  if num_devices % slices:
    raise ValueError(f"{num_devices} devices do not split into {slices} equal slices")
  ici = _fill({"data": config.mesh.data, "fsdp": config.mesh.fsdp}, num_devices // slices,
              "devices of a slice" if slices > 1 else "devices")
  dcn = _fill({"dcn_data": config.mesh.get("dcn_data", -1)}, slices, "slices")
  return {**dcn, **ici}


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> Mesh:
  """Mesh of `devices` (default: all, across processes) with axes BATCH_AXES from config.mesh.

  On TPUs `mesh_utils` lays each slice's (data, fsdp) grid over the chips' torus, and slices
  are stacked along `data`. Elsewhere the devices keep `jax.devices()`'s order (by process), so
  each process's devices form a contiguous block of the flattened mesh and hold a contiguous
  block of the batch: its own slice.
  """
  devices = jax.devices() if devices is None else list(devices)
  slices = num_slices(devices)
  shape = mesh_shape(config, len(devices), slices)
  ici = (shape["data"], shape["fsdp"])
  if slices > 1:
    grid = mesh_utils.create_hybrid_device_mesh(ici, (shape["dcn_data"], 1), devices,
                                                allow_split_physical_axes=True)
  else:
    grid = mesh_utils.create_device_mesh(ici, devices, allow_split_physical_axes=True)
  return Mesh(grid, BATCH_AXES)


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


_WARNED = set()


def _path(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def state_shardings(tree, mesh: Mesh, config: ml_collections.ConfigDict):
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs (the train state, any part).

  Logs a warning (once per set) naming the tensors of at least `mesh.fsdp_min_size` elements
  that stay replicated because no dimension divides the `fsdp` size.
  """
  fsdp_size = mesh.shape["fsdp"]
  min_size = config.mesh.get("fsdp_min_size", DEFAULT_FSDP_MIN_SIZE)
  shardings = jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp_size, min_size)),
                           tree)
  if fsdp_size > 1:
    left = [(_path(p), tuple(x.shape)) for p, x in jax.tree_util.tree_leaves_with_path(tree)
            if int(np.prod(x.shape, dtype=np.int64)) >= min_size
            and fsdp_spec(x.shape, fsdp_size, min_size) == P()]
    key = (fsdp_size, tuple(left))
    if left and key not in _WARNED:
      _WARNED.add(key)
      elements = sum(int(np.prod(s)) for _, s in left)
      logging.warning(
          "FSDP over %d devices leaves %d tensors (%s elements) replicated: no dimension "
          "divides %d: %s", fsdp_size, len(left), f"{elements:,}", fsdp_size,
          ", ".join(f"{name} {shape}" for name, shape in left))
  return shardings


def shards_params(config: ml_collections.ConfigDict) -> bool:
  """Are the model's parameters sharded over `fsdp` (FSDP), or whole on every device (ZeRO)?"""
  return bool(config.mesh.get("shard_params", True))


def whole(tree, mesh: Mesh):
  """NamedShardings that keep every leaf of `tree` whole on every device."""
  return jax.tree.map(lambda _: replicated(mesh), tree)


def param_shardings(tree, mesh: Mesh, config: ml_collections.ConfigDict):
  """NamedShardings for the trained parameters: `state_shardings`, or whole on every device
  where `config.mesh.shard_params` is False."""
  return state_shardings(tree, mesh, config) if shards_params(config) else whole(tree, mesh)


def bytes_per_device(tree, shardings=None) -> int:
  """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `shardings`
  (default: each leaf's own `.sharding`)."""
  if shardings is None:
    shardings = jax.tree.map(lambda x: x.sharding, tree)
  total = 0
  for x, s in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shard = s.shard_shape(x.shape)
    total += int(np.prod(shard, dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def round_up_to_devices(n: int, mesh: Mesh) -> int:
  """The smallest multiple of the mesh's device count that holds `n` examples (a batch split
  over every device; evaluation pads its last batch up to it)."""
  devices = mesh.devices.size
  return -(-n // devices) * devices


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


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order (its own examples)."""
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])
