"""Latent-space SemFlow from a diffusers folder: convert -> train -> segment and synthesise."""

import os

import jax
import numpy as np
import torch
from PIL import Image

from configs import sd15
from semflow_jax import convert, parallel, sample, state as state_lib, train
from semflow_jax.semflow import SemFlow
from tests import sd_fixtures as fx


def test_converted_sd_folder_trains_segments_and_synthesises(tmp_path, tfds_dir):
  root = str(tmp_path / "sd")
  unet_ref, vae_ref, _, _ = fx.save_pipeline(root, sd15.TINY_UNET, sd15.TINY_VAE,
                                             sd15.TINY_CONTEXT_TOKENS)
  converted = convert.convert(str(tmp_path / "converted"), diffusers_dir=root)
  config = sd15.get_config("tiny")
  config.data.tfds_data_dir = tfds_dir
  config.model.init_from = converted
  model = SemFlow.from_config(config)
  assert model.latent_shape == (8, 8, 4)
  initial = convert.load_converted(converted, jax.eval_shape(model.init, jax.random.PRNGKey(0)))

  # The latents and the velocity follow the SD conventions, checked against diffusers itself:
  # z0 = posterior mean x 0.18215 at inference, UNet timestep 1000 t, the empty-prompt context.
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  x = torch.from_numpy(fx.nchw(images.astype(np.float32) / 127.5 - 1.0))
  with torch.no_grad():
    z_ref = vae_ref.encode(x).latent_dist.mean * 0.18215  # pyright: ignore[reportAttributeAccessIssue]
    t = torch.tensor([0.25, 0.75])
    context = torch.from_numpy(np.repeat(initial["context"], 2, axis=0))
    v_ref = unet_ref(z_ref, 1000 * t, context).sample.numpy()
  z = model.encode_image(initial, images)
  np.testing.assert_allclose(fx.nchw(z), z_ref.numpy(), rtol=1e-4, atol=1e-5)
  v = model.velocity(initial, z, t.numpy())
  np.testing.assert_allclose(fx.nchw(v), v_ref, atol=1e-4 * np.abs(v_ref).max())

  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == config.train.num_steps and np.isfinite(result["miou_euler_1"])
  trained, step = state_lib.load_params(config, workdir, parallel.make_mesh(config))
  assert step == config.train.num_steps
  # The VAE and the text embedding are frozen; the UNet is what trains.
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(trained["vae"]), initial["vae"])
  np.testing.assert_array_equal(trained["context"], initial["context"])
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         jax.device_get(trained["unet"]), initial["unet"])
  assert all(jax.tree.leaves(changed))

  image_path = str(tmp_path / "photo.png")
  Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(image_path)
  labels = sample.segment_file(config, workdir, image_path, str(tmp_path / "labels.png"))
  assert labels.shape == (20, 28) and labels.max() < config.data.num_classes
  mask_path = str(tmp_path / "mask.png")
  Image.fromarray(rng.integers(0, config.data.num_classes, (16, 16), dtype=np.uint8)).save(
      mask_path)
  paths = sample.synthesize_file(config, workdir, mask_path, str(tmp_path / "synth"), 2)
  outputs = [np.asarray(Image.open(p)) for p in paths]
  assert [o.shape for o in outputs] == [(16, 16, 3)] * 2
  assert not np.array_equal(outputs[0], outputs[1])  # the perturbation makes them differ
  assert os.path.exists(os.path.join(workdir, "eval", f"metrics_{step}.json"))
