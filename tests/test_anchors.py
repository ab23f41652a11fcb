import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax import anchors

PALETTE_CASES = [(name, k) for name in anchors.PALETTES for k in (2, 7, 19, 171, 216)]


def _min_distance(points):
  """Smallest pairwise Euclidean distance, by brute force over all pairs."""
  p = np.asarray(points, np.float64)
  d = np.linalg.norm(p[:, None] - p[None], axis=-1)
  return d[~np.eye(len(p), dtype=bool)].min()


@pytest.mark.parametrize("c", [0, 1, 5, 6, 7, 35, 36, 43, 100, 170, 215])
def test_paper_palette_matches_eq7(c):
  # Eq. 7 with k = 6, s = 50: red varies slowest.
  expected = [50 * (c // 36), 50 * ((c // 6) % 6), 50 * (c % 6)]
  assert anchors.paper_colours(216)[c].tolist() == expected
  palette = anchors.make_palette("paper", 216)
  np.testing.assert_allclose(palette.colours[c], np.array(expected) / 127.5 - 1, atol=1e-6)


def test_paper_palette_is_216_distinct_colours_and_ignore_is_white():
  p = anchors.paper_colours()
  assert p.shape == (216, 3)
  assert len({tuple(x) for x in p}) == 216
  assert (255, 255, 255) not in {tuple(x) for x in p}
  palette = anchors.make_palette("paper", 171)
  assert palette.table()[anchors.IGNORE_LABEL].tolist() == [1, 1, 1]
  assert palette.half_spacing == pytest.approx(25 / 127.5)  # s / 2 on the 0..255 scale
  with pytest.raises(ValueError):
    anchors.make_palette("paper", 217)


def test_spread_palette_places_anchors_at_least_a_grid_step_apart():
  for k in range(2, 217):
    _check_spread_palette(k)


def _check_spread_palette(k):
  palette = anchors.make_palette("spread", k)
  colours = np.asarray(palette.colours)
  assert colours.shape == (k, 3)
  assert len({tuple(np.round(c, 6)) for c in colours}) == k
  assert colours.min() >= -1 and colours.max() <= 1
  # The promise: at least as far apart as the regular grid with the fewest levels per channel
  # whose cube holds K points, over the full 0..255 range (2 / (L - 1) in [-1, 1] units), and
  # never closer than the paper's 50 / 127.5, whatever K.
  levels = next(n for n in range(2, 8) if n**3 >= k)
  distance = _min_distance(colours)
  assert distance >= 2 / (levels - 1) - 1e-6
  assert distance > 50 / 127.5
  assert palette.min_distance == pytest.approx(distance, rel=1e-6)
  # The ignore colour is not an anchor and decodes unambiguously far from the nearest one.
  gap = np.min(np.linalg.norm(colours - np.asarray(palette.ignore), axis=-1))
  assert gap >= 0.5 * distance


def test_spread_palette_for_the_known_cases():
  # 7 classes: the 7 cube corners other than white (255 apart, 5.1x the paper's 50).
  seven = anchors.make_palette("spread", 7)
  corners = {tuple(c) for c in itertools.product((-1.0, 1.0), repeat=3)} - {(1.0, 1.0, 1.0)}
  assert set(seven.colours) == corners and seven.ignore == (1.0, 1.0, 1.0)
  assert seven.half_spacing == pytest.approx(1.0)
  # 2 classes: opposite corners (red and cyan), white free for ignore.
  two = anchors.make_palette("spread", 2)
  assert _min_distance(two.colours) == pytest.approx(2 * np.sqrt(3))
  # 19 classes (Cityscapes, CelebAMask-HQ): a 3x3x3 grid, 2.55x the paper's spacing.
  assert _min_distance(anchors.make_palette("spread", 19).colours) == pytest.approx(1.0)
  # 8 classes use every corner, so ignore moves to the centre of the cube.
  eight = anchors.make_palette("spread", 8)
  assert eight.ignore == (0.0, 0.0, 0.0) and _min_distance(eight.colours) == pytest.approx(2.0)
  # 171 classes (COCO-Stuff): the 7-level checkerboard, sqrt(2) * 255 / 6 apart.
  assert _min_distance(anchors.make_palette("spread", 171).colours) == pytest.approx(
      np.sqrt(2) * 2 / 6)


@pytest.mark.parametrize("name,k", PALETTE_CASES)
def test_render_decode_round_trip(name, k):
  palette = anchors.make_palette(name, k)
  rng = np.random.default_rng(k)
  labels = rng.integers(0, k, (4, 16, 16))
  clean = anchors.render(labels, palette)
  assert clean.shape == (4, 16, 16, 3)
  np.testing.assert_allclose(np.asarray(clean)[labels == 1], np.tile(palette.colours[1],
                                                                     ((labels == 1).sum(), 1)))
  np.testing.assert_array_equal(anchors.decode(clean, palette), labels)
  np.testing.assert_array_equal(anchors.render(labels[..., None], palette), clean)
  # Ignore is drawn in the ignore colour, and decodes to some class of the dataset.
  ignore = anchors.render(np.full((2, 2), anchors.IGNORE_LABEL), palette)
  np.testing.assert_allclose(np.asarray(ignore), np.broadcast_to(palette.ignore, (2, 2, 3)))
  assert np.asarray(anchors.decode(ignore, palette)).max() < k


@pytest.mark.parametrize("name,k", PALETTE_CASES)
def test_perturbation_below_half_spacing_never_changes_a_label_and_the_bound_is_tight(name, k):
  palette = anchors.make_palette(name, k)
  h = palette.half_spacing
  colours = np.asarray(palette.colours)
  # The Voronoi cell of an anchor is convex, so the box |e|_inf <= r lies inside it iff its 8
  # corners do: check every corner of every anchor's box.
  signs = np.asarray(list(itertools.product((-1.0, 1.0), repeat=3)))
  corners = colours[:, None, :] + signs[None] * 0.999 * h              # (K, 8, 3)
  decoded = np.asarray(anchors.decode(corners, palette))
  np.testing.assert_array_equal(decoded, np.repeat(np.arange(k)[:, None], 8, axis=1))
  # Just past the bound some corner of some anchor's box crosses to another class.
  beyond = np.asarray(anchors.decode(colours[:, None, :] + signs[None] * 1.01 * h, palette))
  assert (beyond != np.arange(k)[:, None]).any()
  # Eq. 14 noise at the largest admissible fraction keeps every label.
  labels = np.random.default_rng(0).integers(0, k, (4, 16, 16))
  noisy = anchors.perturb(anchors.render(labels, palette), jax.random.PRNGKey(0), palette, 0.999)
  deviation = np.abs(np.asarray(noisy - anchors.render(labels, palette)))
  assert deviation.max() <= 0.999 * h + 1e-6 and deviation.max() > 0.9 * h
  np.testing.assert_array_equal(anchors.decode(noisy, palette), labels)


def test_perturbation_is_a_fraction_of_half_spacing_refused_at_one_or_more():
  paper, spread = anchors.make_palette("paper", 7), anchors.make_palette("spread", 7)
  x = jnp.zeros((64, 64, 3))
  # The paper's beta = 0.1 (U[0, 1) - 0.5 scaled by 0.1) is 0.255 of its half spacing.
  noise = np.asarray(anchors.perturb(x, jax.random.PRNGKey(1), paper, anchors.PAPER_PERTURBATION))
  assert noise.min() >= -0.05 and noise.max() <= 0.05 and noise.max() > 0.049
  assert abs(noise.mean()) < 2e-3
  assert abs(noise.std() - 0.1 / np.sqrt(12)) < 2e-3
  # The same fraction on the spread palette scales with its spacing (255 / 50 = 5.1x).
  wide = np.asarray(anchors.perturb(x, jax.random.PRNGKey(1), spread, anchors.PAPER_PERTURBATION))
  np.testing.assert_allclose(wide, noise * 5.1, rtol=1e-5, atol=1e-6)
  other = np.asarray(anchors.perturb(x, jax.random.PRNGKey(2), paper, 0.255))
  assert not np.array_equal(noise, other)
  for bad in (1.0, 1.5, -0.1):
    with pytest.raises(ValueError, match="fraction of half the anchor spacing"):
      anchors.perturb(x, jax.random.PRNGKey(1), paper, bad)


def test_decode_only_considers_the_dataset_classes():
  # White (ignore) and the paper's anchors beyond num_classes are never predicted.
  palette = anchors.make_palette("paper", 7)
  assert np.asarray(anchors.decode(jnp.ones((4, 4, 3)), palette)).max() < 7
  far_anchor = anchors.make_palette("paper", 216).table()[200]
  assert np.asarray(anchors.decode(jnp.broadcast_to(far_anchor, (4, 4, 3)), palette)).max() < 7
  # Labels the dataset does not have are drawn like ignore, not as some other anchor.
  np.testing.assert_allclose(palette.table()[200], palette.ignore)


def test_unknown_palette_is_refused():
  with pytest.raises(ValueError, match="unknown palette 'rainbow'"):
    anchors.make_palette("rainbow", 7)
  with pytest.raises(ValueError, match="num_classes"):
    anchors.make_palette("spread", 256)


def test_coarse_perturbation_components_stay_within_the_bound():
  palette = anchors.make_palette("spread", 7)
  x = jnp.zeros((4, 32, 32, 3))
  key = jax.random.PRNGKey(3)
  shift = np.asarray(anchors.perturb(x, key, palette, 0.5, grids=(1,)))
  # One shift per image and channel, different between images.
  np.testing.assert_allclose(shift, np.broadcast_to(shift[:, :1, :1], shift.shape), atol=1e-6)
  assert not np.allclose(shift[0, 0, 0], shift[1, 0, 0])
  mixed = np.asarray(anchors.perturb(x, key, palette, 0.5, grids=(0, 1, 4)))
  assert np.abs(mixed).max() <= 0.5 * palette.half_spacing + 1e-6
  # The smooth part makes neighbouring pixels correlated; per-pixel noise alone does not.
  pixel = np.asarray(anchors.perturb(x, key, palette, 0.5))
  corr = lambda a: np.corrcoef(a[:, :, 1:].ravel(), a[:, :, :-1].ravel())[0, 1]
  assert abs(corr(pixel)) < 0.05 and corr(mixed) > 0.5
  with pytest.raises(ValueError, match="perturbation_grids"):
    anchors.perturb(x, key, palette, 0.5, grids=())


@pytest.mark.parametrize("make_keys", [lambda i: jax.random.PRNGKey(i),
                                       lambda i: jax.random.key(i)])
@pytest.mark.parametrize("grids", [(0,), (0, 1, 4)])
def test_per_example_keys_make_each_examples_noise_independent_of_its_batch(make_keys, grids):
  palette = anchors.make_palette("spread", 7)
  perturb = lambda x, key: np.asarray(anchors.perturb(x, key, palette, 0.1, grids))
  anchor = jnp.zeros((4, 8, 8, 3))
  keys = jnp.stack([make_keys(i) for i in (10, 11, 12, 13)])
  batch = perturb(anchor, keys)
  # The same example alone, or in another batch, gets the same noise from the same key (bit
  # for bit per pixel; the bilinear upsampling of coarse grids may round differently by batch).
  same = np.testing.assert_array_equal if grids == (0,) else functools.partial(
      np.testing.assert_allclose, rtol=0, atol=1e-7)
  for i in range(4):
    same(batch[i], perturb(anchor[:1], keys[i:i + 1])[0])
  same(perturb(anchor[:2], keys[2:]), batch[2:])
  assert not np.array_equal(batch[0], batch[1])
  assert np.abs(batch).max() <= 0.1 * palette.half_spacing + 1e-6
  # One key for the batch still works (training, the file CLI) and differs per example.
  single = perturb(anchor, make_keys(10))
  assert not np.array_equal(single[0], single[1])
  with pytest.raises(ValueError, match="3 keys for a batch of 4"):
    perturb(anchor, keys[:3])
