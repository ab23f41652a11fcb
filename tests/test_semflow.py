import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax import anchors
from semflow_jax.semflow import SemFlow


def _model(tiny_config, **overrides):
  for k, v in overrides.items():
    tiny_config.model[k] = v
  model = SemFlow.from_config(tiny_config)
  return model, model.init(jax.random.PRNGKey(0))


@pytest.mark.parametrize("skip", [True, False])
def test_velocity_preconditioning(tiny_config, skip):
  model, params = _model(tiny_config, input_skip=skip)
  # The UNet's output layer starts at zero, so the velocity is exactly the skip term.
  z = jax.random.normal(jax.random.PRNGKey(1), (2, *model.latent_shape))
  for t in (0.0, 0.3, 1.0):
    expected = (2 * t - 1) * z if skip else jnp.zeros_like(z)
    np.testing.assert_allclose(model.velocity(params, z, t), expected, atol=1e-6)  # pyright: ignore[reportCallIssue]
  # Per-example times broadcast per example.
  v = model.velocity(params, z, jnp.array([0.0, 1.0]))
  if skip:
    np.testing.assert_allclose(v[0], -z[0], atol=1e-6)
    np.testing.assert_allclose(v[1], z[1], atol=1e-6)  # pyright: ignore[reportCallIssue]


def test_one_step_segmentation_reads_the_unet_output_directly_with_the_skip(tiny_config):
  # With the skip, z1 = z0 + v(z0, 0) = UNet(z0, 0): an untrained (zero) UNet segments every
  # pixel as the anchor nearest to 0, whatever the image.
  model, params = _model(tiny_config, input_skip=True)
  size = tiny_config.data.image_size
  images = np.random.default_rng(0).integers(0, 256, (3, size, size, 3), dtype=np.uint8)
  labels = np.asarray(model.segment(params, images, steps=1))
  expected = int(model.decode_anchors(jnp.zeros((1, 3)))[0])
  assert (labels == expected).all()


def test_beta_time_sampling_favours_the_ends(tiny_config):
  model, _ = _model(tiny_config, time_sampling="beta", time_beta=0.5)
  t = np.asarray(model.sample_times(jax.random.PRNGKey(0), 20000))
  assert t.min() >= 0 and t.max() <= 1
  ends = np.mean((t < 0.1) | (t > 0.9))
  assert 0.38 < ends < 0.44  # arcsine law: 4/pi * asin(sqrt(0.1)) = 0.41; uniform gives 0.2
  uniform, _ = _model(tiny_config, time_sampling="uniform")
  u = np.asarray(uniform.sample_times(jax.random.PRNGKey(0), 20000))
  assert 0.18 < np.mean((u < 0.1) | (u > 0.9)) < 0.22


def test_loss_ignores_masked_examples(tiny_config):
  model, params = _model(tiny_config)
  size = tiny_config.data.image_size
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (4, size, size, 3), dtype=np.uint8),
           "label": rng.integers(0, 7, (4, size, size, 1), dtype=np.uint8)}
  key = jax.random.PRNGKey(2)
  full = model.loss(params, batch, key)
  masked = dict(batch, mask=np.array([1, 1, 0, 0], np.float32))
  garbage = dict(masked, image=batch["image"].copy())
  garbage["image"][2:] = 255 - garbage["image"][2:]
  assert np.isfinite(full)
  np.testing.assert_allclose(model.loss(params, masked, key), model.loss(params, garbage, key),
                             rtol=1e-6)


def test_bad_model_config_values_are_named(tiny_config):
  tiny_config.model.time_sampling = "logit_normal"
  with pytest.raises(ValueError, match="config.model.time_sampling"):
    SemFlow.from_config(tiny_config)
  tiny_config.model.time_sampling = "uniform"
  tiny_config.model.perturbation = 1.0
  with pytest.raises(ValueError, match="config.model.perturbation=1.0 must be in"):
    SemFlow.from_config(tiny_config)
  tiny_config.model.perturbation = 0.5
  tiny_config.model.perturbation_grids = ()
  with pytest.raises(ValueError, match="config.model.perturbation_grids"):
    SemFlow.from_config(tiny_config)
  tiny_config.model.perturbation_grids = (0,)
  tiny_config.model.palette = "rainbow"
  with pytest.raises(ValueError, match="config.model.palette='rainbow'"):
    SemFlow.from_config(tiny_config)
  tiny_config.model.palette = "paper"
  tiny_config.data.num_classes = 217
  with pytest.raises(ValueError, match="config.model.palette='paper' with config.data.num_classes"):
    SemFlow.from_config(tiny_config)


@pytest.mark.parametrize("palette", anchors.PALETTES)
def test_the_model_renders_perturbs_and_decodes_with_its_palette(tiny_config, palette):
  model, _ = _model(tiny_config, palette=palette, perturbation=0.9)
  expected = anchors.make_palette(palette, tiny_config.data.num_classes)
  assert model.palette == expected
  labels = np.random.default_rng(0).integers(0, 7, (2, 8, 8, 1)).astype(np.uint8)
  clean = model.render_anchors(labels)
  np.testing.assert_allclose(clean, expected.array[labels[..., 0]])
  noisy = model.perturbed_anchors(labels, jax.random.PRNGKey(0))
  assert np.abs(np.asarray(noisy - clean)).max() <= 0.9 * expected.half_spacing + 1e-6
  np.testing.assert_array_equal(model.decode_anchors(noisy), labels[..., 0])
  record = model.checkpoint_record()
  assert record["palette"] == palette and len(record["anchors"]) == 7
