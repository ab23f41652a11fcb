"""The sharded train step on 8 fake CPU devices computes what one device computes, for data
parallel and FSDP meshes; FSDP really splits the large tensors; gradient accumulation works;
meshes put slices along the data axis; FSDP names the tensors it cannot split."""

import dataclasses

import jax
import numpy as np
import pytest

from semflow_jax import parallel, state as state_lib
from semflow_jax.data import pipeline
from semflow_jax.semflow import SemFlow
from semflow_jax.step import make_train_step


def _run(config, devices, batches, initial):
  """Train from `initial` (host arrays) on a mesh of `devices`; (state, losses, scratch bytes)."""
  mesh = parallel.make_mesh(config, devices)
  model = SemFlow.from_config(config)
  tx = state_lib.make_optimizer(config)
  shardings = state_lib.shardings_of(state_lib.abstract(model, tx, config, mesh))
  state = jax.device_put(initial, shardings)
  batch = parallel.to_global(batches[0], mesh)
  step = jax.jit(make_train_step(model, tx, config, mesh),
                 out_shardings=(shardings, parallel.replicated(mesh)),
                 donate_argnums=0).lower(state, batch).compile()
  losses = []
  for b in batches:
    batch = parallel.to_global(b, mesh)
    assert len(batch["image"].sharding.device_set) == len(devices)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses, step.memory_analysis().temp_size_in_bytes


def _assert_same_params(params, reference, lr):
  """Within 1e-5 relative over the whole model, and tensor by tensor up to Adam noise.

  Elementwise relative equality is not expected: Adam divides by sqrt(v), so for a parameter
  whose gradient is ~0 (an attention key bias's is exactly 0 in exact arithmetic),
  summation-order noise in the all-reduce becomes a difference of a small fraction of the step
  size in that element. A sharding bug moves many elements by whole steps (lr).
  """
  flat, flat_ref = jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(reference)
  assert len(flat) == len(flat_ref)
  diff = np.sqrt(sum(np.sum((np.asarray(a) - b) ** 2) for a, b in zip(flat, flat_ref)))
  norm = np.sqrt(sum(np.sum(np.square(b)) for b in flat_ref))
  assert diff / norm < 1e-5, diff / norm
  for a, b in zip(flat, flat_ref):
    a, b = np.asarray(a), np.asarray(b)
    rms_noise = 1e-4 * lr * np.sqrt(b.size)
    assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b) + rms_noise, b.shape
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=0.1 * lr)


@pytest.fixture(scope="module")
def setup(tfds_dir):
  """5 batches, an initial state (created sharded, by state_lib.create) and a one-device run."""
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.data.tfds_data_dir = tfds_dir
  config.train.ema_decay = 0.9
  config.mesh.fsdp_min_size = 1024
  config.model.channel_mult = (1,)  # one level: the same layer types, half the compile time
  builder = pipeline.get_builder(config.data)
  batches = [b for _, b in zip(range(5), pipeline.TrainIterator(builder, 16, seed=0))]
  config.mesh.data, config.mesh.fsdp = 4, 2
  mesh = parallel.make_mesh(config)
  initial = state_lib.create(SemFlow.from_config(config), state_lib.make_optimizer(config),
                             config, mesh)
  assert any("fsdp" in x.sharding.spec for x in jax.tree.leaves(initial.params))
  initial = jax.device_get(initial)
  config.mesh.data, config.mesh.fsdp = 1, 1
  one_device = _run(config, jax.devices()[:1], batches, initial)
  return config, batches, initial, one_device


def test_data_parallel_and_fsdp_meshes_match_one_device(setup):
  assert jax.device_count() == 8
  config, batches, initial, (reference, losses_1, _) = setup
  params_1 = jax.device_get(reference.params)
  assert losses_1[0] != losses_1[-1]  # the parameters really moved
  lr = config.train.learning_rate

  for data, fsdp in [(8, 1), (4, 2), (1, 8)]:
    config.mesh.data, config.mesh.fsdp = data, fsdp
    state, losses, _ = _run(config, jax.devices(), batches, initial)
    np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
    _assert_same_params(state.params, params_1, lr)
    _assert_same_params(state.ema_params, jax.device_get(reference.ema_params), lr)

    # Layout: with fsdp > 1 every tensor the rule can split is split over `fsdp` (params, Adam
    # moments, EMA), in memory as well as in name; the rest is replicated.
    sharded = 0
    for x in jax.tree.leaves(state):
      spec = x.sharding.spec
      splittable = (fsdp > 1 and x.size >= 1024 and any(d % fsdp == 0 for d in x.shape))
      assert ("fsdp" in spec) == splittable, (x.shape, spec)
      if splittable:
        axis = list(spec).index("fsdp")
        assert x.addressable_shards[0].data.shape[axis] == x.shape[axis] // fsdp
        sharded += x.size
    total = sum(x.size for x in jax.tree.leaves(state))
    if fsdp > 1:
      assert sharded > 0.9 * total  # nearly all bytes are in large tensors


def test_zero_layout_keeps_params_whole_shards_the_rest_and_matches_one_device(setup):
  """mesh.shard_params=False: the same training as one device; the parameters whole on every
  device, the Adam moments and the EMA split over `fsdp` by the rule."""
  config, batches, initial, (reference, losses_1, _) = setup
  config = config.copy_and_resolve_references()
  config.mesh.data, config.mesh.fsdp, config.mesh.shard_params = 2, 4, False
  state, losses, _ = _run(config, jax.devices(), batches, initial)
  np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
  lr = config.train.learning_rate
  _assert_same_params(state.params, jax.device_get(reference.params), lr)
  _assert_same_params(state.ema_params, jax.device_get(reference.ema_params), lr)
  for x in jax.tree.leaves(state.params):
    assert x.sharding.is_fully_replicated, x.shape
    assert x.addressable_shards[0].data.shape == x.shape
  moments = [x for x in jax.tree.leaves((state.opt_state, state.ema_params)) if x.size >= 1024]
  assert moments and all("fsdp" in x.sharding.spec for x in moments
                         if any(d % 4 == 0 for d in x.shape))
  assert sum("fsdp" in x.sharding.spec for x in moments) > len(moments) // 2


def test_fsdp_rule_on_any_tree():
  rule = parallel.fsdp_spec
  assert rule((3, 3, 64, 128), 8, 1024) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
  assert rule((320, 1280), 16, 1024) == jax.sharding.PartitionSpec(None, "fsdp")
  assert rule((768, 320), 64, 1024) == jax.sharding.PartitionSpec("fsdp")  # both divide: largest
  assert rule((100, 320), 64, 1024) == jax.sharding.PartitionSpec(None, "fsdp")
  assert rule((7, 9, 11, 13), 2, 1024) == jax.sharding.PartitionSpec()  # nothing divisible
  assert rule((64,), 8, 1024) == jax.sharding.PartitionSpec()  # small: replicated
  assert rule((4096,), 8, 1024) == jax.sharding.PartitionSpec("fsdp")
  assert rule((4096, 4096), 1, 1024) == jax.sharding.PartitionSpec()  # no fsdp axis


def test_gradient_accumulation_matches_one_device_and_bounds_activation_memory(setup):
  config, batches, initial, (_, _, temp_full) = setup
  config.train.grad_accum_steps = 4
  config.mesh.data, config.mesh.fsdp = 1, 1
  reference, losses_1, temp_accumulated = _run(config, jax.devices()[:1], batches[:2], initial)
  config.mesh.data, config.mesh.fsdp = 2, 2
  state, losses, _ = _run(config, jax.devices()[:4], batches[:2], initial)
  np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
  _assert_same_params(state.params, jax.device_get(reference.params),
                      config.train.learning_rate)
  # The point of micro-batches: the compiled step's scratch memory (activations) shrinks.
  assert temp_accumulated < 0.5 * temp_full, (temp_accumulated, temp_full)


def test_mesh_shape_per_slice_and_across_slices(tiny_config):
  mesh = tiny_config.mesh
  mesh.data, mesh.fsdp = -1, 1
  assert parallel.mesh_shape(tiny_config, 8) == {"dcn_data": 1, "data": 8, "fsdp": 1}
  mesh.data, mesh.fsdp = 1, -1
  # -1 fills a slice's devices; dcn_data=-1 takes every slice.
  assert parallel.mesh_shape(tiny_config, 32, slices=2) == {"dcn_data": 2, "data": 1, "fsdp": 16}
  mesh.data, mesh.fsdp = -1, 8
  assert parallel.mesh_shape(tiny_config, 32, slices=2) == {"dcn_data": 2, "data": 2, "fsdp": 8}
  mesh.data, mesh.fsdp = 1, 32  # FSDP cannot cross slices: 32 devices are two slices of 16
  with pytest.raises(ValueError, match="config.mesh: data=1 x fsdp=32 does not fill the 16 "
                                       "devices of a slice"):
    parallel.mesh_shape(tiny_config, 32, slices=2)
  mesh.fsdp, mesh.dcn_data = -1, 3
  with pytest.raises(ValueError, match="dcn_data=3 does not fill the 2 slices"):
    parallel.mesh_shape(tiny_config, 32, slices=2)
  mesh.data, mesh.fsdp, mesh.dcn_data = -1, -1, -1
  with pytest.raises(ValueError, match="at most one of data, fsdp may be -1"):
    parallel.mesh_shape(tiny_config, 8)


def test_mesh_of_two_slices_crosses_them_on_the_data_axis_only(tiny_config):
  """What launch/tpu.sh --slices=2 gives the run: devices carrying slice_index 0 and 1 (stand-ins,
  two processes per slice). With config.mesh.dcn_data unset or -1 (the default) the mesh takes
  every slice, as the planner's v5e-16x2 assumes: each row of the `data` axis lies in one slice
  (FSDP stays on a slice's interconnect) and the slices follow each other along `data`."""
  @dataclasses.dataclass(frozen=True)
  class Device:  # not a tuple: numpy would make its fields an axis
    id: int
    slice_index: int
    process_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"

  devices = [Device(i, slice_index=i // 8, process_index=i // 4) for i in range(16)]
  mesh_config = tiny_config.mesh
  assert mesh_config.dcn_data == -1
  for data, fsdp, shape in ((1, -1, {"data": 2, "fsdp": 8}), (-1, 4, {"data": 4, "fsdp": 4})):
    mesh_config.data, mesh_config.fsdp = data, fsdp
    for unset in (False, True):
      config = tiny_config.copy_and_resolve_references()
      if unset:
        del config.mesh["dcn_data"]
      mesh = parallel.make_mesh(config, devices)
      assert dict(mesh.shape) == shape
      slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
      assert (slice_of == slice_of[:, :1]).all()             # a row (an FSDP group): one slice
      rows = shape["data"] // 2
      assert list(slice_of[:, 0]) == [0] * rows + [1] * rows  # slice 0's rows, then slice 1's
      assert sorted(d.id for d in mesh.devices.flat) == list(range(16))
  mesh_config.data, mesh_config.fsdp, mesh_config.dcn_data = 1, -1, 2
  assert dict(parallel.make_mesh(tiny_config, devices).shape) == {"data": 2, "fsdp": 8}


def test_cpu_mesh_keeps_the_process_order(tiny_config):
  tiny_config.mesh.data, tiny_config.mesh.fsdp = 2, 4
  mesh = parallel.make_mesh(tiny_config)
  assert mesh.axis_names == parallel.BATCH_AXES and dict(mesh.shape) == {"data": 2, "fsdp": 4}
  assert list(mesh.devices.flat) == jax.devices()
  assert parallel.round_up_to_devices(13, mesh) == 16
  assert parallel.round_up_to_devices(16, mesh) == 16


def test_fsdp_warns_naming_the_tensors_it_leaves_replicated(tiny_config, caplog):
  tiny_config.mesh.data, tiny_config.mesh.fsdp = 1, 8
  mesh = parallel.make_mesh(tiny_config)
  tree = {"conv": {"kernel": jax.ShapeDtypeStruct((3, 3, 100, 300), np.float32)},
          "dense": {"kernel": jax.ShapeDtypeStruct((256, 512), np.float32)},
          "bias": jax.ShapeDtypeStruct((300,), np.float32)}
  with caplog.at_level("WARNING"):
    shardings = parallel.state_shardings(tree, mesh, tiny_config)
  # The largest dimension that 8 divides: 512, the output features.
  assert shardings["dense"]["kernel"].spec == jax.sharding.PartitionSpec(None, "fsdp")
  assert shardings["conv"]["kernel"].spec == jax.sharding.PartitionSpec()
  warnings = [r.getMessage() for r in caplog.records if "replicated" in r.getMessage()]
  assert len(warnings) == 1
  assert "conv/kernel (3, 3, 100, 300)" in warnings[0] and "dense" not in warnings[0]
  assert "bias" not in warnings[0]  # small tensors are replicated by choice, not named
