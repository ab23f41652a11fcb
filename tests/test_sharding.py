"""The jitted, sharded train step on 8 fake CPU devices computes what one device computes."""

import jax
import numpy as np
from jax.sharding import Mesh

from semflow_jax import parallel, state as state_lib
from semflow_jax.data import pipeline
from semflow_jax.semflow import SemFlow
from semflow_jax.train import make_train_step


def _run(config, devices, batches):
  mesh = Mesh(np.asarray(devices).reshape(len(devices), 1), parallel.BATCH_AXES)
  model = SemFlow.from_config(config)
  tx = state_lib.make_optimizer(config)
  state = state_lib.create(model, tx, config, mesh)
  step = jax.jit(make_train_step(model, tx, config),
                 in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=(parallel.replicated(mesh), parallel.replicated(mesh)),
                 donate_argnums=0)
  losses, grad_norms = [], []
  for b in batches:
    batch = parallel.to_global(b, mesh)
    assert len(batch["image"].sharding.device_set) == len(devices)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
    grad_norms.append(float(metrics["grad_norm"]))
  return jax.device_get(state.params), losses, grad_norms


def test_sharded_step_on_8_devices_matches_one_device(tiny_config):
  assert jax.device_count() == 8
  tiny_config.train.ema_decay = 0.9
  builder = pipeline.get_builder(tiny_config.data)
  batches = [b for _, b in zip(range(3), pipeline.train_iterator(builder, 16, seed=0))]
  params_1, losses_1, grads_1 = _run(tiny_config, jax.devices()[:1], batches)
  params_8, losses_8, grads_8 = _run(tiny_config, jax.devices(), batches)
  np.testing.assert_allclose(losses_8, losses_1, rtol=1e-5)
  np.testing.assert_allclose(grads_8, grads_1, rtol=1e-5)
  assert losses_1[0] != losses_1[-1]  # the parameters really moved
  # Adam divides by sqrt(v): for a parameter whose gradient is ~0, summation-order noise in the
  # all-reduce becomes a difference of up to the step size (lr = 2e-3) in that one element.
  # 1e-5 absolute is 0.5 % of one step; a sharding bug moves parameters by whole steps.
  lr = tiny_config.train.learning_rate
  for a, b in zip(jax.tree.leaves(params_1), jax.tree.leaves(params_8)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=5e-3 * lr)
