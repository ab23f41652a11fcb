import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax import anchors


@pytest.mark.parametrize("c", [0, 1, 5, 6, 7, 35, 36, 43, 100, 170, 215])
def test_palette_matches_eq7(c):
  # Eq. 7 with k = 6, s = 50: red varies slowest.
  expected = [50 * (c // 36), 50 * ((c // 6) % 6), 50 * (c % 6)]
  assert anchors.palette(216)[c].tolist() == expected
  assert anchors.colour_table()[c].tolist() == expected


def test_palette_is_216_distinct_colours_and_ignore_is_white():
  p = anchors.palette()
  assert p.shape == (216, 3)
  assert len({tuple(x) for x in p}) == 216
  assert (255, 255, 255) not in {tuple(x) for x in p}
  assert anchors.colour_table()[anchors.IGNORE_LABEL].tolist() == [255, 255, 255]
  with pytest.raises(ValueError):
    anchors.palette(217)


def test_render_scales_to_unit_range_and_accepts_channel_axis():
  labels = np.array([[0, 1], [43, 255]], np.uint8)
  img = np.asarray(anchors.render(labels))
  assert img.shape == (2, 2, 3)
  np.testing.assert_allclose(img[0, 0], [-1, -1, -1])
  np.testing.assert_allclose(img[1, 0], np.array([50, 50, 50]) / 127.5 - 1)  # 43 = 36 + 6 + 1
  np.testing.assert_allclose(img[1, 1], [1, 1, 1])
  np.testing.assert_array_equal(anchors.render(labels[..., None]), img)


@pytest.mark.parametrize("num_classes", [7, 19, 171])
def test_decode_inverts_render_under_sub_half_spacing_perturbation(num_classes):
  rng = np.random.default_rng(num_classes)
  labels = rng.integers(0, num_classes, (4, 16, 16))
  clean = anchors.render(labels)
  np.testing.assert_array_equal(anchors.decode(clean, num_classes), labels)
  # Worst case: every channel pushed by just under half the spacing, with random signs.
  signs = rng.choice([-1.0, 1.0], clean.shape)
  worst = clean + 0.99 * anchors.HALF_SPACING * signs
  np.testing.assert_array_equal(anchors.decode(worst, num_classes), labels)
  # Eq. 14 noise at the default and the largest admissible amplitude.
  for amplitude in (anchors.DEFAULT_PERTURBATION, 1.98 * anchors.HALF_SPACING):
    noisy = anchors.perturb(clean, jax.random.PRNGKey(0), amplitude)
    np.testing.assert_array_equal(anchors.decode(noisy, num_classes), labels)


def test_perturbation_beyond_half_spacing_changes_labels():
  # The bound is tight: pushing past half the spacing moves pixels to a neighbouring anchor.
  labels = np.full((8, 8), 7)
  pushed = anchors.render(labels) + 1.05 * anchors.HALF_SPACING
  assert (np.asarray(anchors.decode(pushed, 216)) != 7).all()


def test_perturbation_is_uniform_with_the_given_amplitude():
  x = jnp.zeros((64, 64, 3))
  noise = np.asarray(anchors.perturb(x, jax.random.PRNGKey(1), 0.1))
  assert noise.min() >= -0.05 and noise.max() < 0.05
  assert abs(noise.mean()) < 2e-3
  assert abs(noise.std() - 0.1 / np.sqrt(12)) < 2e-3
  other = np.asarray(anchors.perturb(x, jax.random.PRNGKey(2), 0.1))
  assert not np.array_equal(noise, other)


def test_decode_only_considers_the_dataset_classes():
  # White (ignore) and anchors beyond num_classes are never predicted.
  white = jnp.ones((4, 4, 3))
  decoded = np.asarray(anchors.decode(white, 7))
  assert decoded.max() < 7
  far_anchor = anchors.render(np.full((4, 4), 200))
  assert np.asarray(anchors.decode(far_anchor, 7)).max() < 7


@pytest.mark.parametrize("make_keys", [lambda i: jax.random.PRNGKey(i),
                                       lambda i: jax.random.key(i)])
def test_per_example_keys_make_each_examples_noise_independent_of_its_batch(make_keys):
  anchor = jnp.zeros((4, 3, 5, 3))
  keys = jnp.stack([make_keys(i) for i in (10, 11, 12, 13)])
  batch = np.asarray(anchors.perturb(anchor, keys, 0.1))
  # The same example alone, or in another batch, gets the same noise from the same key.
  for i in range(4):
    alone = np.asarray(anchors.perturb(anchor[:1], keys[i:i + 1], 0.1))[0]
    np.testing.assert_array_equal(batch[i], alone)
  np.testing.assert_array_equal(np.asarray(anchors.perturb(anchor[:2], keys[2:], 0.1)), batch[2:])
  assert not np.array_equal(batch[0], batch[1])
  assert np.abs(batch).max() <= 0.05
  # One key for the batch still works (training, the file CLI) and differs per example.
  single = np.asarray(anchors.perturb(anchor, make_keys(10), 0.1))
  assert not np.array_equal(single[0], single[1])
  with pytest.raises(ValueError, match="3 keys for a batch of 4"):
    anchors.perturb(anchor, keys[:3], 0.1)
