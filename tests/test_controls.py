"""Editing, style-reference synthesis, regional re-sampling and ensembles on the tiny config.

The model is the tiny pixel-space SemFlow with random (not zero) UNet weights, so the velocity
field is non-trivial. Expected values come from host-side Euler loops written here from the
definitions (end point shifted by the anchor colours, the (1 - t_s) / t_s mix, ...), not from
the functions under test.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax import colour, controls
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow

STEPS = 3


@pytest.fixture(scope="module")
def setup():
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.model.palette = "paper"  # the expected values below render Eq. 7 themselves
  config.model.perturbation_grids = (0,)  # ... and Eq. 14's per-pixel noise
  model = SemFlow.from_config(config)

  @jax.jit
  def random_params():
    # The UNet's output layer starts at zero (velocity 0); random weights everywhere make the
    # field depend on z and t, so an integration error would show.
    leaves, tree = jax.tree.flatten(model.init(jax.random.PRNGKey(0))["unet"])
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    return {"unet": jax.tree.unflatten(tree, [
        leaf + 0.05 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)])}

  params = random_params()
  size = config.data.image_size
  rng = np.random.default_rng(0)
  labels = np.zeros((3, size, size), np.uint8)
  labels[:, size // 2:] = 1
  labels[:, 2:6, 3:9] = 2
  labels[1, 10:14, 4:12] = 5
  images = rng.integers(0, 256, (3, size, size, 3), dtype=np.uint8)
  return model, params, Programs(model), labels, images


def _euler(model, params, z, t_start, t_end, steps):
  """Independent fixed-step Euler loop on the host."""
  dt = (t_end - t_start) / steps
  for i in range(steps):
    z = z + dt * model.velocity(params, z, t_start + i * dt)
  return z


def _render(labels):
  # The anchor image from the published palette (Eq. 7), not from anchors.render.
  c = labels.astype(np.int64)
  rgb = np.stack([c // 36, (c // 6) % 6, c % 6], -1) * 50
  return rgb / 127.5 - 1.0


def test_edit_moves_the_end_point_by_the_anchor_difference(setup):
  model, params, programs, labels, images = setup
  target = labels.copy()
  target[labels == 2] = 3
  target[0, 0, 0] = 255  # 255 keeps the source label
  out = programs.edit(STEPS, "euler", blend=False)(params, images, labels, target)
  assert out.shape == images.shape and out.dtype == jnp.float32
  z1 = _euler(model, params, images / 127.5 - 1.0, 0.0, 1.0, STEPS)
  target[0, 0, 0] = labels[0, 0, 0]
  z1 = z1 + (_render(target) - _render(labels))
  expected = np.clip(_euler(model, params, z1, 1.0, 0.0, STEPS), -1, 1)
  np.testing.assert_allclose(out, expected, atol=2e-5)
  again = programs.edit(STEPS, "euler", blend=False)(params, images, labels, target)
  np.testing.assert_array_equal(out, again)


def test_blended_edit_keeps_the_photo_outside_the_region_exactly(setup):
  model, params, programs, labels, images = setup
  target = labels.copy()
  target[labels == 2] = 3
  blended = programs.edit(STEPS, "euler", blend=True)(params, images, labels, target)
  outside = (labels == target)[..., None]
  np.testing.assert_array_equal(np.where(outside, programs.to_uint8(blended), 0),
                                np.where(outside, images, 0))
  shifted = programs.edit(STEPS, "euler", blend=False)(params, images, labels, target)
  inside = ~outside[..., 0]
  # Inside, both start from the same shifted end point; they differ, but not wildly.
  assert not np.array_equal(np.asarray(blended)[inside], np.asarray(shifted)[inside])
  # Nothing to edit: the blend returns the photo, the shift its forward-backward reconstruction.
  same = programs.edit(STEPS, "euler", blend=True)(params, images, labels, labels)
  np.testing.assert_array_equal(programs.to_uint8(same), images)


def test_style_strength_one_is_plain_synthesis_exactly(setup):
  model, params, programs, labels, images = setup
  rng = jax.random.PRNGKey(3)
  plain = programs.synthesize(STEPS, "euler")(params, labels, rng)
  styled = programs.synthesize_styled(1.0, STEPS, "euler")(params, labels, images[::-1], rng)
  np.testing.assert_array_equal(styled, plain)


def test_style_starts_from_the_mix_and_zero_returns_the_reference(setup):
  model, params, programs, labels, images = setup
  rng = jax.random.PRNGKey(3)
  ref = images[::-1]
  out = programs.synthesize_styled(0.6, 5, "euler")(params, labels, ref, rng)
  u = np.asarray(jax.random.uniform(rng, (*labels.shape, 3)))  # Eq. 14, drawn as documented
  # The paper's beta (0.1) is model.perturbation (PAPER_PERTURBATION) x half its 50/255 spacing.
  z_mask = _render(labels) + model.perturbation * (25 / 127.5) * (2 * u - 1)
  z = 0.4 * (ref / 127.5 - 1.0) + 0.6 * z_mask
  expected = np.clip(_euler(model, params, z, 0.6, 0.0, 3), -1, 1)  # round(5 * 0.6) steps
  np.testing.assert_allclose(out, expected, atol=2e-5)
  zero = programs.synthesize_styled(0.0, STEPS, "euler")(params, labels, ref, rng)
  np.testing.assert_array_equal(programs.to_uint8(zero), ref)
  with pytest.raises(ValueError, match="strength=1.5 must be in"):
    controls.synthesize_styled(model, params, labels, ref, rng, strength=1.5)


def test_colour_transfer_matches_lab_statistics_and_refinement_is_deterministic(setup):
  model, params, programs, labels, images = setup
  rng = jax.random.PRNGKey(4)
  ref = (np.linspace(40, 200, images[0].size).reshape(images[0].shape)[None]
         .repeat(3, 0).astype(np.uint8))
  run = programs.synthesize_styled(0.8, STEPS, "euler", colour_transfer=True, refine=1)
  out = run(params, labels, ref, rng)
  np.testing.assert_array_equal(out, run(params, labels, ref, rng))
  lab_out = np.asarray(colour.rgb_to_lab((np.asarray(out) + 1) / 2)).reshape(3, -1, 3)
  lab_ref = np.asarray(colour.rgb_to_lab(ref / 255.0)).reshape(3, -1, 3)
  np.testing.assert_allclose(lab_out.mean(1), lab_ref.mean(1), atol=1.0)
  np.testing.assert_allclose(lab_out.std(1), lab_ref.std(1), atol=1.0)
  once = programs.synthesize_styled(0.8, STEPS, "euler", colour_transfer=True)(
      params, labels, ref, rng)
  assert not np.array_equal(out, once)


def test_lab_against_published_values():
  # sRGB primaries and white in CIE L*a*b* (D65), as tabulated by e.g. Bruce Lindbloom's
  # calculator: red (53.24, 80.09, 67.20), green (87.73, -86.18, 83.18), blue (32.30, 79.19,
  # -107.86), white (100, 0, 0), mid grey 128 (53.59, 0, 0).
  rgb = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1], [128 / 255] * 3])
  expected = np.array([[53.24, 80.09, 67.20], [87.73, -86.18, 83.18], [32.30, 79.19, -107.86],
                       [100, 0, 0], [53.59, 0, 0]])
  np.testing.assert_allclose(colour.rgb_to_lab(rgb), expected, atol=0.02)
  x = np.random.default_rng(0).uniform(0, 1, (100, 3))
  np.testing.assert_allclose(colour.lab_to_rgb(colour.rgb_to_lab(x)), x, atol=1e-4)


def test_resampling_no_class_is_the_original_and_every_class_is_a_new_sample(setup):
  model, params, programs, labels, _ = setup
  rng, new_rng = jax.random.PRNGKey(5), jax.random.PRNGKey(6)
  synthesize = programs.synthesize(STEPS, "euler")
  original = synthesize(params, labels, rng)
  run = programs.resample(STEPS, "euler")
  none = np.zeros(labels.shape, bool)
  np.testing.assert_array_equal(run(params, labels, none, rng, new_rng), original)
  every = np.ones(labels.shape, bool)
  np.testing.assert_array_equal(run(params, labels, every, rng, new_rng),
                                synthesize(params, labels, new_rng))


def test_resampling_a_class_changes_it_and_the_blend_keeps_the_rest_exactly(setup):
  model, params, programs, labels, _ = setup
  rng, new_rng = jax.random.PRNGKey(5), jax.random.PRNGKey(6)
  original = np.asarray(programs.synthesize(STEPS, "euler")(params, labels, rng))
  region = np.isin(np.asarray(labels), (2, 5))
  for blend in (False, True):
    out = np.asarray(programs.resample(STEPS, "euler", blend)(params, labels, region, rng,
                                                               new_rng))
    inside = np.abs(out - original)[region].mean()
    outside = np.abs(out - original)[~region].mean()
    assert inside > 0.01 and outside < inside / 3, (blend, inside, outside)
    if blend:
      np.testing.assert_array_equal(out[~region], original[~region])


def test_ensemble_of_one_or_of_copies_is_the_model_and_of_two_averages(setup):
  model, params, programs, labels, images = setup
  rng = jax.random.PRNGKey(7)
  segment, synthesize = programs.segment(STEPS, "euler"), programs.synthesize(STEPS, "euler")
  one = controls.ensemble([params])
  np.testing.assert_array_equal(segment(one, images), segment(params, images))
  np.testing.assert_array_equal(synthesize(one, labels, rng), synthesize(params, labels, rng))
  # Two identical members: (v + v) / 2 is v exactly.
  np.testing.assert_array_equal(segment(controls.ensemble([params, params]), images),
                                segment(params, images))
  other = {"unet": jax.tree.map(lambda p: 0.5 * p, params["unet"])}
  pair = controls.ensemble([params, other])
  z = jnp.asarray(images / 127.5 - 1.0, jnp.float32)
  expected = (model.velocity(params, z, 0.3) + model.velocity(other, z, 0.3)) / 2
  np.testing.assert_allclose(model.velocity(pair, z, 0.3), expected, atol=1e-6)
  np.testing.assert_allclose(programs.edit(STEPS, "euler", True)(pair, images, labels, labels),
                             images / 127.5 - 1, atol=1e-6)  # controls take ensembles too


def test_ensemble_refuses_members_with_different_frozen_parts():
  a = {"unet": {"w": np.ones(2)}, "vae": {"w": np.ones(3)}}
  b = {"unet": {"w": np.zeros(2)}, "vae": {"w": np.zeros(3)}}
  with pytest.raises(ValueError, match="runs/b: its frozen 'vae' parameters differ from runs/a"):
    controls.ensemble([a, b], ["runs/a", "runs/b"])
  assert len(controls.ensemble([a, dict(b, vae=a["vae"])])["unet"]) == 2


def test_latent_mask_any_pools_to_the_latent_grid():
  model = type("M", (), {"latent_shape": (2, 2, 4)})()
  region = np.zeros((1, 4, 4), bool)
  region[0, 3, 0] = True
  np.testing.assert_array_equal(controls.latent_mask(model, region)[0, ..., 0],
                                [[False, False], [True, False]])


def test_controls_in_sd_latent_space():
  """The same guarantees with the SD UNet and VAE (random weights, latents at 1/2 resolution)."""
  from configs import sd15
  model = SemFlow.from_config(sd15.get_config("tiny"))

  @jax.jit
  def random_params():
    params = model.init(jax.random.PRNGKey(0))
    leaves, tree = jax.tree.flatten(params["unet"])
    keys = jax.random.split(jax.random.PRNGKey(1), len(leaves))
    unet = jax.tree.unflatten(tree, [leaf + 0.05 * jax.random.normal(k, leaf.shape)
                                     for leaf, k in zip(leaves, keys)])
    return {**params, "unet": unet}

  params, programs = random_params(), Programs(model)
  size = model.image_size[0]
  assert model.latent_shape[0] < size  # a real latent space
  rng = np.random.default_rng(3)
  labels = np.zeros((2, size, size), np.uint8)
  labels[:, size // 2:] = 1
  labels[:, 2:8, 2:8] = 4
  images = rng.integers(0, 256, (2, size, size, 3), dtype=np.uint8)
  key, new_key = jax.random.PRNGKey(8), jax.random.PRNGKey(9)
  plain = programs.synthesize(2, "euler")(params, labels, key)
  np.testing.assert_array_equal(
      programs.synthesize_styled(1.0, 2, "euler")(params, labels, images, key), plain)
  np.testing.assert_array_equal(
      programs.resample(2, "euler", True)(params, labels, np.zeros_like(labels, bool), key,
                                          new_key), plain)
  target = np.where(labels == 4, 5, labels).astype(np.uint8)
  for blend in (False, True):
    out = programs.edit(2, "euler", blend)(params, images, labels, target)
    assert out.shape == images.shape and np.isfinite(out).all()
  # Nothing edited with the blend: the photo's latent comes back, decoded.
  same = programs.edit(2, "euler", True)(params, images, labels, labels)
  expected = jax.jit(lambda p, x: jnp.clip(model.decode(p, model.encode_image(p, x)), -1, 1))(
      params, images)
  np.testing.assert_allclose(same, expected, atol=1e-5)
