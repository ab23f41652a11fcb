"""SemFlow end to end against an independent PyTorch implementation of the official procedure.

The reference below is written from the paper (Wang et al., NeurIPS 2024, Eqs. 7, 12-14) and the
conventions of the official release, on diffusers' `UNet2DConditionModel` and `AutoencoderKL`
with tiny random weights (tests/sd_fixtures.py), sharing nothing with semflow_jax but the weight
files: semflow_jax reads them through its converter. Same weights, inputs and noise, so the
training loss, the segmentation labels and the synthesised images must agree. The test fails if
the direction of time, the 0.18215 latent scaling or the anchor palette changes on either side.
"""

import jax
import numpy as np
import pytest
import torch

from configs import sd15
from semflow_jax import convert
from semflow_jax.semflow import SemFlow
from tests import sd_fixtures as fx

SCALING = 0.18215   # SD-1.x VAE latent scaling
BETA = 0.1          # Eq. 14 perturbation amplitude, in [-1, 1] units
NUM_CLASSES = 216  # the whole palette, so random decoder outputs reach many anchors
STEPS = 3


# -- the reference: torch + diffusers, the official conventions -------------------------------
def paper_palette(num_classes):
  """Eq. 7, k = 6, s = 50: class c -> 50 * (c // 36, (c // 6) % 6, c % 6), red slowest."""
  return np.array([[50 * (c // 36), 50 * ((c // 6) % 6), 50 * (c % 6)]
                   for c in range(num_classes)], np.float32)


def anchor_image(labels):
  """(B, H, W) class ids (255 = ignore -> white) -> (B, 3, H, W) anchor image in [-1, 1]."""
  table = np.full((256, 3), 255.0, np.float32)
  table[:NUM_CLASSES] = paper_palette(NUM_CLASSES)
  return torch.from_numpy(table[labels].transpose(0, 3, 1, 2) / 127.5 - 1.0)


class OfficialSemFlow:
  def __init__(self, unet, vae, context):
    self.unet, self.vae, self.context = unet, vae, context

  def image_latent(self, images, eps=None):
    """Posterior sample (training) or mean (inference) of the image, times 0.18215."""
    posterior = self.vae.encode(images).latent_dist
    z = posterior.mean if eps is None else posterior.mean + posterior.std * eps
    return z * SCALING

  def anchor_latent(self, labels, uniform):
    """Posterior mean of the perturbed anchor image (Eq. 14), times 0.18215."""
    perturbed = anchor_image(labels) + BETA * (uniform - 0.5)
    return self.vae.encode(perturbed).latent_dist.mean * SCALING

  def velocity(self, z, t):
    t = torch.as_tensor(t, dtype=torch.float32).expand(z.shape[0])
    context = self.context.expand(z.shape[0], -1, -1)
    return self.unet(z, 1000.0 * t, encoder_hidden_states=context).sample

  def loss(self, images, labels, eps, uniform, t):
    z0 = self.image_latent(images, eps)
    z1 = self.anchor_latent(labels, uniform)
    tt = t.view(-1, 1, 1, 1)
    zt = (1 - tt) * z0 + tt * z1
    return torch.mean((self.velocity(zt, t) - (z1 - z0)) ** 2)

  def segment(self, images, steps):
    """Euler from t = 0 (image) to t = 1 (mask), decode, nearest anchor."""
    z = self.image_latent(images)
    for i in range(steps):
      z = z + (1.0 / steps) * self.velocity(z, i / steps)
    decoded = self.vae.decode(z / SCALING).sample                       # (B, 3, H, W)
    anchors = torch.from_numpy(paper_palette(NUM_CLASSES) / 127.5 - 1.0)
    distance = ((decoded[:, None] - anchors[None, :, :, None, None]) ** 2).sum(2)
    return distance.argmin(1)

  def synthesize(self, labels, uniform, steps):
    """Euler from the perturbed anchor latent at t = 1 back to t = 0, decode."""
    z = self.anchor_latent(labels, uniform)
    for i in range(steps):
      z = z - (1.0 / steps) * self.velocity(z, 1.0 - i / steps)
    return self.vae.decode(z / SCALING).sample.clamp(-1, 1)


def empty_prompt_context(tokenizer, encoder):
  ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                  return_tensors="pt").input_ids
  return encoder(ids).last_hidden_state


# -- the comparison ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def both(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("sd"))
  unet, vae, tokenizer, encoder = fx.save_pipeline(root, sd15.TINY_UNET, sd15.TINY_VAE,
                                                   sd15.TINY_CONTEXT_TOKENS)
  converted = convert.convert(str(tmp_path_factory.mktemp("converted") / "sd"),
                              diffusers_dir=root)
  config = sd15.get_config("tiny")
  config.data.num_classes = NUM_CLASSES
  model = SemFlow.from_config(config)
  params = convert.load_converted(converted, jax.eval_shape(model.init, jax.random.PRNGKey(0)))
  with torch.no_grad():
    reference = OfficialSemFlow(unet, vae, empty_prompt_context(tokenizer, encoder))
  rng = np.random.default_rng(0)
  size = config.data.image_size
  images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  labels = rng.integers(0, NUM_CLASSES, (2, size, size)).astype(np.uint8)
  labels[0, :3, :5] = 255  # ignore pixels are drawn white
  return model, params, reference, images, labels


def _torch(x):
  return torch.from_numpy(np.array(x, np.float32))  # a writable copy


def test_training_loss_matches_the_official_procedure(both):
  model, params, reference, images, labels = both
  rng = jax.random.PRNGKey(7)
  loss = float(jax.jit(model.loss)(params, {"image": images, "label": labels[..., None]}, rng))
  # The same noise, drawn as SemFlow.loss draws it: posterior noise, Eq. 14 noise, times.
  rng_z0, rng_z1, rng_t, _ = jax.random.split(rng, 4)
  latent = (2, *model.latent_shape)
  eps = fx.nchw(jax.random.normal(rng_z0, latent))
  uniform = fx.nchw(jax.random.uniform(rng_z1, (*labels.shape, 3)))
  t = np.asarray(jax.random.uniform(rng_t, (2,)))
  with torch.no_grad():
    expected = float(reference.loss(_torch(fx.nchw(images / 127.5 - 1.0)), labels, _torch(eps),
                                    _torch(uniform), _torch(t)))
  assert loss == pytest.approx(expected, rel=1e-4)


def test_segmentation_labels_match_the_official_procedure(both):
  model, params, reference, images, _ = both
  ours = np.asarray(jax.jit(model.segment, static_argnums=(2,))(params, images, STEPS))
  with torch.no_grad():
    theirs = reference.segment(_torch(fx.nchw(images / 127.5 - 1.0)), STEPS).numpy()
  assert len(np.unique(theirs)) > 3  # a real test case, not one class everywhere
  np.testing.assert_array_equal(ours, theirs)


def test_synthesised_images_match_the_official_procedure(both):
  model, params, reference, _, labels = both
  rng = jax.random.PRNGKey(11)
  ours = np.asarray(jax.jit(model.synthesize, static_argnums=(3,))(params, labels, rng, STEPS))
  uniform = fx.nchw(jax.random.uniform(rng, (*labels.shape, 3)))  # SemFlow's Eq. 14 noise
  with torch.no_grad():
    theirs = fx.nhwc(reference.synthesize(labels, _torch(uniform), STEPS).numpy())
  assert np.abs(theirs).max() > 0.1
  np.testing.assert_allclose(ours, theirs, atol=2e-4 * np.abs(theirs).max())
