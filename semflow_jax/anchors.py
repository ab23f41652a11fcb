"""Anchor colours: the palette, labels <-> anchor images, and the finite perturbation (Eq. 14).

Pure math, no I/O. Works on numpy and jax arrays alike (anything `jnp` accepts). Anchor images
live in [-1, 1] like images (0..255 scale: value / 127.5 - 1).

Two palettes (`make_palette(name, num_classes)`):

- 'paper' (Eq. 7): class c is s * (c // k^2, (c // k) % k, c % k) on the 0..255 scale with
  k = 6, s = 50 (216 anchors, red varying slowest), whatever the number of classes, so any K
  puts its anchors 50 apart (0.39 in [-1, 1] units), mostly along the blue axis.
- 'spread': the dataset's K anchors as far apart as the colour cube allows. The candidates are
  the L x L x L grids over the full 0..255 range and their checkerboard halves (points whose
  grid coordinates sum to an even number: a face-centred cubic lattice, whose nearest
  neighbours are sqrt(2) grid steps apart); the one with the largest minimum distance that
  holds K anchors (plus a free point for the ignore colour) wins; 2 classes take opposite
  corners. 7 classes get 7 cube corners
  (255 apart instead of 50), 19 classes a 3x3x3 grid (127.5), 171 classes the 7-level
  checkerboard (60.1).

The ignore label 255 is drawn in a colour that is never an anchor: white, unless white is an
anchor (a full grid of exactly K points), then the centre of the first grid cell.
"""

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np

IGNORE_LABEL = 255
MAX_CLASSES = 255                       # labels are uint8 and 255 means ignore
PALETTES = ("paper", "spread")
PAPER_K, PAPER_SPACING = 6, 50          # Eq. 7
PAPER_NUM_ANCHORS = PAPER_K**3
# The paper's Eq. 14 amplitude beta = 0.1 in [-1, 1] units is a maximum deviation of beta / 2
# per channel, i.e. this fraction of its palette's half spacing (50 / 255).
PAPER_PERTURBATION = 0.05 / (PAPER_SPACING / 255.0)   # 0.255


@dataclasses.dataclass(frozen=True)
class Palette:
  """K anchor colours and the ignore colour, (r, g, b) in [-1, 1]. Hashable, so it can sit on
  a jitted model."""
  name: str
  colours: tuple   # K tuples (r, g, b)
  ignore: tuple    # (r, g, b): the colour of label 255, never an anchor

  @property
  def num_classes(self) -> int:
    return len(self.colours)

  @property
  def array(self) -> np.ndarray:
    """float32 (K, 3) anchors in [-1, 1]."""
    return np.asarray(self.colours, np.float32)

  @property
  def min_distance(self) -> float:
    """Smallest Euclidean distance between two anchors, [-1, 1] units."""
    return float(np.sqrt(_pairwise(self.array)[0].min()))

  @property
  def half_spacing(self) -> float:
    """The largest per-channel deviation (in [-1, 1] units) that can never change a label.

    x = a_i + e is nearer a_i than a_j iff e . d < |d|^2 / 2 with d = a_j - a_i; the largest
    e . d over |e|_inf <= r is r |d|_1, so every label is kept iff r < min |d|^2 / (2 |d|_1).
    On a grid with spacing s this is s / 2: half the anchor spacing.
    """
    sq, l1 = _pairwise(self.array)
    return float((sq / (2.0 * l1)).min())

  def table(self) -> np.ndarray:
    """float32 (256, 3) lookup: row c < K is the anchor of class c, every other row (255 =
    ignore, and labels the dataset does not have) the ignore colour."""
    table = np.tile(np.asarray(self.ignore, np.float32), (256, 1))
    table[:self.num_classes] = self.array
    return table


def _pairwise(points: np.ndarray):
  """(squared distances, L1 distances) over all unordered pairs."""
  i, j = np.triu_indices(len(points), k=1)
  d = points[j].astype(np.float64) - points[i].astype(np.float64)
  return np.sum(d * d, axis=-1), np.sum(np.abs(d), axis=-1)


def _check_num_classes(num_classes: int, most: int) -> None:
  if not 2 <= num_classes <= most:
    raise ValueError(f"num_classes must be in 2..{most} for this palette, got {num_classes}")


def paper_colours(num_classes: int = PAPER_NUM_ANCHORS) -> np.ndarray:
  """The first `num_classes` Eq. 7 anchors, uint8 (num_classes, 3) on the 0..255 scale."""
  if not 0 < num_classes <= PAPER_NUM_ANCHORS:
    raise ValueError(f"num_classes must be in 1..{PAPER_NUM_ANCHORS}, got {num_classes}")
  c = np.arange(num_classes)
  rgb = np.stack([c // PAPER_K**2, (c // PAPER_K) % PAPER_K, c % PAPER_K], axis=-1) * PAPER_SPACING
  return rgb.astype(np.uint8)


def _spread_candidates(num_classes: int):
  """(min distance, levels, checkerboard, grid points) for each grid that can hold K anchors
  and an ignore colour; grid points are integer coordinates in 0..L-1, red varying slowest."""
  for levels in range(2, 8):
    grid = np.asarray(list(itertools.product(range(levels), repeat=3)))
    step = 2.0 / (levels - 1)
    for checkerboard in (False, True):
      points = grid[grid.sum(-1) % 2 == 0] if checkerboard else grid
      is_white = np.all(points == levels - 1, axis=-1)
      # White stays free for the ignore label, unless a full grid needs every point.
      if checkerboard or len(points) != num_classes:
        points = points[~is_white]
      if len(points) >= num_classes:
        yield (step * (np.sqrt(2.0) if checkerboard else 1.0), levels, checkerboard, points)


def spread_colours(num_classes: int):
  """(float32 (K, 3) anchors, (3,) ignore colour) in [-1, 1] for the 'spread' palette."""
  _check_num_classes(num_classes, MAX_CLASSES)
  if num_classes == 2:  # opposite corners (cyan, red), sqrt(3) x 255 apart; white stays free
    return np.asarray([[-1, 1, 1], [1, -1, -1]], np.float32), np.ones(3, np.float32)
  # Largest minimum distance; among equals the fewest levels, full grid first.
  _, levels, _, points = max(_spread_candidates(num_classes), key=lambda c: (c[0], -c[1], not c[2]))
  if len(points) > num_classes:
    points = _farthest_first(points, num_classes)
  unit = points / (levels - 1) * 2.0 - 1.0
  if any(np.all(points == levels - 1, axis=-1)):   # white is an anchor: ignore in a grid cell
    ignore = np.full(3, 1.0 / (levels - 1) - 1.0)
  else:
    ignore = np.ones(3)
  return unit.astype(np.float32), ignore.astype(np.float32)


def _farthest_first(points: np.ndarray, k: int) -> np.ndarray:
  """k of `points` picked greedily, each as far as possible from those already picked
  (starting at black; ties go to the earlier point), so a partly used grid stays spread out.
  The chosen rows keep their grid order."""
  chosen = [0]
  dist = np.sum((points - points[0]) ** 2, axis=-1).astype(np.float64)
  for _ in range(k - 1):
    nxt = int(np.argmax(dist))
    chosen.append(nxt)
    dist = np.minimum(dist, np.sum((points - points[nxt]) ** 2, axis=-1))
  return points[np.sort(chosen)]


def make_palette(name: str, num_classes: int) -> Palette:
  """The palette `name` ('paper' or 'spread') for a dataset of `num_classes` classes."""
  if name == "paper":
    _check_num_classes(num_classes, PAPER_NUM_ANCHORS)
    colours, ignore = to_unit_range(paper_colours(num_classes)), np.ones(3, np.float32)
  elif name == "spread":
    colours, ignore = spread_colours(num_classes)
  else:
    raise ValueError(f"unknown palette {name!r}; expected one of {PALETTES}")
  return Palette(name=name, colours=tuple(tuple(float(v) for v in c) for c in np.asarray(colours)),
                 ignore=tuple(float(v) for v in np.asarray(ignore)))


def to_unit_range(rgb_uint8):
  """uint8 0..255 -> float32 [-1, 1]. Host data stays on the host (numpy: evaluation's
  scoring), a jax array or tracer on the device."""
  x = rgb_uint8 if isinstance(rgb_uint8, jax.Array) else np.asarray(rgb_uint8)
  return x.astype(np.float32) / 127.5 - 1.0


def from_unit_range(x):
  """float [-1, 1] -> uint8 0..255 (rounded, clipped), as a saved image is quantised. Host
  data stays on the host (numpy), a jax array or tracer on the device."""
  x = x if isinstance(x, jax.Array) else np.asarray(x)
  return ((x + 1.0) * 127.5).clip(0, 255).round().astype(np.uint8)


def render(labels, palette: Palette):
  """Labels (..., H, W) or (..., H, W, 1) integer -> anchor image (..., H, W, 3) in [-1, 1].

  A gather from a 256-row table, so it runs on the device from uint8 labels.
  """
  labels = jnp.asarray(labels)
  if labels.ndim >= 3 and labels.shape[-1] == 1:
    labels = labels[..., 0]
  return jnp.take(jnp.asarray(palette.table()), labels.astype(jnp.int32), axis=0)


def decode(anchor_image, palette: Palette):
  """Anchor image (..., H, W, 3) in [-1, 1] -> labels (..., H, W) int32, nearest anchor.

  Only the palette's K anchors compete, so every pixel gets a valid class.
  """
  anchors = jnp.asarray(palette.array)  # (K, 3)
  x = jnp.asarray(anchor_image, jnp.float32)
  # |x - a|^2 = |x|^2 - 2 x.a + |a|^2; |x|^2 is the same for every anchor, so drop it.
  scores = -2.0 * jnp.einsum("...c,kc->...k", x, anchors) + jnp.sum(anchors**2, axis=-1)
  return jnp.argmin(scores, axis=-1).astype(jnp.int32)


def check_perturbation(fraction: float, name: str = "perturbation") -> None:
  """A fraction of half the anchor spacing in [0, 1): below 1 no label can change."""
  if not 0.0 <= fraction < 1.0:
    raise ValueError(f"{name}={fraction} must be in [0, 1): it is a fraction of half the anchor "
                     "spacing, and at 1 or more a perturbed anchor could decode to another class")


def check_grids(grids, name: str = "perturbation_grids") -> None:
  if not grids or any(int(g) != g or g < 0 for g in grids):
    raise ValueError(f"{name}={tuple(grids)} must be a non-empty tuple of grid sizes >= 0 "
                     "(0 = every pixel, as in Eq. 14)")


def is_key_batch(rng) -> bool:
  """True for one PRNG key per example ((B,) typed keys or (B, 2) raw keys), False for one key."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim == 1
  return rng.ndim == 2


def _noise(key, shape, grids):
  noise = jnp.zeros(shape, jnp.float32)
  for i, g in enumerate(grids):
    k = key if len(grids) == 1 else jax.random.fold_in(key, i)
    if g == 0:
      noise += 2.0 * jax.random.uniform(k, shape, jnp.float32) - 1.0
    else:
      coarse = 2.0 * jax.random.uniform(k, (*shape[:-3], g, g, shape[-1]), jnp.float32) - 1.0
      noise += jax.image.resize(coarse, shape, "linear")
  return noise / len(grids)


def perturbation_noise(rng, shape, grids=(0,)):
  """The randomness of Eq. 14 in [-1, 1], (..., H, W, 3): drawn apart from `perturb` so callers
  can edit it (regional re-sampling).

  `grids` are the noise's components, averaged: 0 draws U(-1, 1) for every pixel and channel
  (Eq. 14, the default); g > 0 draws it on a g x g grid per image and channel and resizes that
  bilinearly to the image (a convex combination, so still within [-1, 1]): 1 is one colour
  shift per image, 4 a smooth field. Coarse components give synthesis randomness at the scale
  of objects rather than of pixels.

  `rng` is one key for the whole array, or one key per example (leading axis): example i's noise
  then depends on its own key only, not on the batch it is in (evaluation keys it by the
  example's index in the split, so results do not depend on the number of processes).
  """
  check_grids(grids)
  shape = tuple(shape)
  if is_key_batch(rng):
    if rng.shape[0] != shape[0]:
      raise ValueError(f"{rng.shape[0]} keys for a batch of {shape[0]} anchor images")
    return jax.vmap(lambda key: _noise(key, shape[1:], grids))(rng)
  return _noise(rng, shape, grids)


def perturb(anchor_image, rng, palette: Palette, fraction: float, grids=(0,), noise=None):
  """Eq. 14 with the amplitude as a fraction of half the anchor spacing: each channel moves by
  at most fraction * palette.half_spacing. The paper's beta = 0.1 is PAPER_PERTURBATION
  (0.255) with the paper's palette. The noise is `perturbation_noise(rng, shape, grids)`, or
  the given `noise` in [-1, 1] of the anchor image's shape.
  """
  check_perturbation(fraction)
  if noise is None:
    noise = perturbation_noise(rng, jnp.shape(anchor_image), grids)
  return anchor_image + (fraction * palette.half_spacing) * noise
