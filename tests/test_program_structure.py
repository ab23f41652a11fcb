"""The shape of the compiled programs, which sets what they cost to compile (issue 29): a TPU
compile spends its time lowering the program's operations one by one, so a layout that repeats
the UNet per micro-batch, per sampler step or per rematerialisation multiplies it. Counted in the
lowered StableHLO of the tiny SD-shaped config (latent space with a VAE, as the recipes), on CPU;
no timing."""

import re

import jax
import numpy as np
import pytest

from semflow_jax import parallel, state as state_lib, step as step_lib
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow


@pytest.fixture()
def config():
  from configs import celebamask_hq
  c = celebamask_hq.get_config("tiny")
  c.train.batch_size = 16
  c.mesh.data, c.mesh.fsdp = 2, 4
  return c


def _convolutions(lowered: jax.stages.Lowered) -> int:
  return len(re.findall(r"stablehlo\.convolution", lowered.as_text()))


def _lower_step(config) -> jax.stages.Lowered:
  mesh = parallel.make_mesh(config)
  model = SemFlow.from_config(config, mesh)
  tx = state_lib.make_optimizer(config)
  abstract_state = state_lib.abstract(model, tx, config, mesh)
  return step_lib.lower_train_step(model, tx, config, mesh, abstract_state,
                                   step_lib.train_batch_spec(model, config))


def _lower_forward(config) -> jax.stages.Lowered:
  """The loss alone (no gradient): the convolutions of one forward pass of the step."""
  mesh = parallel.make_mesh(config)
  model = SemFlow.from_config(config, mesh)
  tx = state_lib.make_optimizer(config)
  abstract_state = state_lib.abstract(model, tx, config, mesh)
  batch = step_lib.abstract_batch(step_lib.train_batch_spec(model, config), mesh)
  loss = lambda state, batch: model.loss(state.model_params(ema=False), batch, state.rng)
  return jax.jit(loss).trace(abstract_state, batch).lower()


def test_micro_batches_share_one_copy_of_the_forward_and_backward(config):
  counts = {}
  for k in (1, 4):
    config.train.grad_accum_steps = k
    counts[k] = _convolutions(_lower_step(config))
  assert counts[1] > 0
  assert counts[4] == counts[1]  # a scan over micro-batches, not k unrolled copies


def test_remat_adds_at_most_one_forward_and_zero_layout_changes_no_operation(config):
  forward = _convolutions(_lower_forward(config))
  config.model.remat = False
  plain = _convolutions(_lower_step(config))
  config.model.remat = True
  remat = _convolutions(_lower_step(config))
  # Without remat: the forward, and per convolution of the UNet two in the backward (input
  # and kernel gradients); the VAE encodes without a gradient.
  assert forward < plain < 3 * forward
  # Remat recomputes the UNet's forward in the backward, once: never more.
  assert plain < remat <= plain + forward
  # Parameters whole on every device (ZeRO) only moves data: the same computation.
  config.mesh.shard_params = False
  assert _convolutions(_lower_step(config)) == remat


def test_samplers_hold_one_unet_whatever_the_step_count(config):
  mesh = parallel.make_mesh(config)
  model = SemFlow.from_config(config, mesh)
  params = state_lib.abstract(model, state_lib.make_optimizer(config), config,
                              mesh).model_params()
  programs = Programs(model)
  h, w = model.image_size
  images = jax.ShapeDtypeStruct((8, h, w, 3), np.uint8)
  labels = jax.ShapeDtypeStruct((8, h, w, 1), np.uint8)
  for name in ("segment", "synthesize"):
    counts = []
    for steps in (1, 25):
      program = getattr(programs, name)(steps=steps, method="euler")
      lowered = (program.lower(params, images) if name == "segment" else
                 program.lower(params, labels, jax.random.PRNGKey(0)))
      counts.append(_convolutions(lowered))
    assert counts[0] > 0 and counts[1] == counts[0], (name, counts)
