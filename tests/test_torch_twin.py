"""benchmarks/torch_twin.py is the PyTorch side of the default config's speed comparison; it is
only a fair comparison if it computes what the Linen UNet computes."""

import jax
import numpy as np
import pytest
import torch

from benchmarks import torch_twin
from configs import synthetic
from semflow_jax.semflow import SemFlow


@pytest.mark.parametrize("arg,patch_size", [("tiny", 1), ("tiny", 2)])
def test_twin_with_the_flax_parameters_computes_the_same_velocity(arg, patch_size):
  config = synthetic.get_config(arg)
  config.model.patch_size = patch_size
  model = SemFlow.from_config(config)
  params = model.init(jax.random.PRNGKey(0))["unet"]
  # Every parameter random: zero-initialised output layers would hide wiring mistakes.
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: rng.normal(0, 0.1, p.shape).astype(np.float32), params)
  twin = torch_twin.from_config(config)
  assert sum(p.numel() for p in twin.parameters()) == sum(p.size for p in
                                                          jax.tree.leaves(params))
  torch_twin.load_flax_params(twin, params)
  size = config.data.image_size
  x = rng.normal(size=(2, size, size, 3)).astype(np.float32)
  t = np.array([3.0, 700.0], np.float32)
  expected = np.asarray(model.unet.apply({"params": params}, x, t))
  with torch.no_grad():
    got = twin(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t))
  got = got.permute(0, 2, 3, 1).numpy()
  assert np.abs(got - expected).max() < 1e-5 * np.abs(expected).max()


def test_twin_training_step_lowers_the_loss():
  config = synthetic.get_config("tiny")
  model = SemFlow.from_config(config)
  twin = torch_twin.from_config(config)
  torch_twin.load_flax_params(twin, model.init(jax.random.PRNGKey(0))["unet"])
  config.train.learning_rate = 1e-3
  trainer = torch_twin.TwinTrainer(twin, config)
  rng = np.random.default_rng(0)
  size = config.data.image_size
  images = torch.from_numpy(rng.integers(0, 256, (8, size, size, 3), dtype=np.uint8))
  labels = torch.from_numpy(rng.integers(0, 7, (8, size, size, 1), dtype=np.uint8))
  losses = [float(trainer.step(images, labels)) for _ in range(15)]
  assert np.isfinite(losses).all() and np.mean(losses[-3:]) < np.mean(losses[:3])
