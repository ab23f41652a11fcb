"""The sharded train step on 8 fake CPU devices computes what one device computes, for data
parallel and FSDP meshes; FSDP really splits the large tensors; gradient accumulation works."""

import jax
import numpy as np
import pytest

from semflow_jax import parallel, state as state_lib
from semflow_jax.data import pipeline
from semflow_jax.semflow import SemFlow
from semflow_jax.train import make_train_step


def _run(config, devices, batches):
  mesh = parallel.make_mesh(config, devices)
  model = SemFlow.from_config(config)
  tx = state_lib.make_optimizer(config)
  state = state_lib.create(model, tx, config, mesh)
  shardings = state_lib.shardings(model, tx, config, mesh)
  step = jax.jit(make_train_step(model, tx, config, mesh),
                 out_shardings=(shardings, parallel.replicated(mesh)), donate_argnums=0)
  losses = []
  for b in batches:
    batch = parallel.to_global(b, mesh)
    assert len(batch["image"].sharding.device_set) == len(devices)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses


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
def batches(tfds_dir):
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.data.tfds_data_dir = tfds_dir
  builder = pipeline.get_builder(config.data)
  return [b for _, b in zip(range(5), pipeline.train_iterator(builder, 16, seed=0))]


def test_data_parallel_and_fsdp_meshes_match_one_device(tiny_config, batches):
  assert jax.device_count() == 8
  tiny_config.train.ema_decay = 0.9
  tiny_config.mesh.fsdp_min_size = 1024
  tiny_config.mesh.data, tiny_config.mesh.fsdp = 1, 1
  reference, losses_1 = _run(tiny_config, jax.devices()[:1], batches)
  params_1 = jax.device_get(reference.params)
  assert losses_1[0] != losses_1[-1]  # the parameters really moved
  lr = tiny_config.train.learning_rate

  for data, fsdp in [(8, 1), (4, 2), (1, 8)]:
    tiny_config.mesh.data, tiny_config.mesh.fsdp = data, fsdp
    state, losses = _run(tiny_config, jax.devices(), batches)
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


def test_gradient_accumulation_matches_one_device_and_bounds_activation_memory(tiny_config,
                                                                               batches):
  tiny_config.train.grad_accum_steps = 4
  tiny_config.mesh.data, tiny_config.mesh.fsdp = 1, 1
  reference, losses_1 = _run(tiny_config, jax.devices()[:1], batches[:2])
  tiny_config.mesh.data, tiny_config.mesh.fsdp = 2, 2
  state, losses = _run(tiny_config, jax.devices()[:4], batches[:2])
  np.testing.assert_allclose(losses, losses_1, rtol=1e-5)
  _assert_same_params(state.params, jax.device_get(reference.params),
                      tiny_config.train.learning_rate)

  # The point of micro-batches: the compiled step's scratch memory shrinks with them.
  def temp_bytes(k, batch_size):
    tiny_config.train.grad_accum_steps = k
    mesh = parallel.make_mesh(tiny_config, jax.devices()[:1])
    model, tx = SemFlow.from_config(tiny_config), state_lib.make_optimizer(tiny_config)
    sharding = parallel.batch_sharding(mesh)
    batch = {k: jax.ShapeDtypeStruct((batch_size, *v.shape[1:]), v.dtype, sharding=sharding)
             for k, v in batches[0].items()}
    compiled = jax.jit(make_train_step(model, tx, tiny_config, mesh), donate_argnums=0).lower(
        state_lib.abstract(model, tx, tiny_config, mesh), batch).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  full, accumulated = temp_bytes(1, 64), temp_bytes(8, 64)
  assert accumulated < 0.5 * full, (accumulated, full)
