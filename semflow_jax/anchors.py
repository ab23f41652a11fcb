"""Anchor colours: labels <-> anchor images (paper Eq. 7) and the finite perturbation (Eq. 14).

Pure math, no I/O. Works on numpy and jax arrays alike (anything `jnp` accepts).

Class c is drawn as the RGB colour s * (c // k^2, (c // k) % k, c % k) on the 0..255 scale with
k = 6, s = 50 (216 anchors, red varying slowest). The ignore label 255 is drawn white, which is
never an anchor. Anchor images live in [-1, 1] like images: value / 127.5 - 1.
"""

import jax
import jax.numpy as jnp
import numpy as np

K = 6
SPACING = 50
NUM_ANCHORS = K**3
IGNORE_LABEL = 255
# Half the distance between neighbouring anchors in [-1, 1] units: a perturbation whose
# per-channel magnitude stays below this can never move a pixel to another anchor.
HALF_SPACING = SPACING / 255.0  # (50 / 127.5) / 2
DEFAULT_PERTURBATION = 0.1


def palette(num_classes: int = NUM_ANCHORS) -> np.ndarray:
  """The first `num_classes` anchor colours, uint8 (num_classes, 3), Eq. 7."""
  if not 0 < num_classes <= NUM_ANCHORS:
    raise ValueError(f"num_classes must be in 1..{NUM_ANCHORS}, got {num_classes}")
  c = np.arange(num_classes)
  rgb = np.stack([c // K**2, (c // K) % K, c % K], axis=-1) * SPACING
  return rgb.astype(np.uint8)


def colour_table() -> np.ndarray:
  """uint8 (256, 3) lookup: row c is the anchor of class c; 216..255 are white (ignore)."""
  table = np.full((256, 3), 255, np.uint8)
  table[:NUM_ANCHORS] = palette(NUM_ANCHORS)
  return table


def to_unit_range(rgb_uint8):
  """uint8 0..255 -> float32 [-1, 1]."""
  return jnp.asarray(rgb_uint8, jnp.float32) / 127.5 - 1.0


def from_unit_range(x):
  """float [-1, 1] -> uint8 0..255 (rounded, clipped)."""
  return jnp.round(jnp.clip((jnp.asarray(x) + 1.0) * 127.5, 0, 255)).astype(jnp.uint8)


def render(labels):
  """Labels (..., H, W) or (..., H, W, 1) integer -> anchor image (..., H, W, 3) in [-1, 1].

  A gather from a 256-row table, so it runs on the device from uint8 labels.
  """
  labels = jnp.asarray(labels)
  if labels.ndim >= 3 and labels.shape[-1] == 1:
    labels = labels[..., 0]
  table = to_unit_range(colour_table())
  return jnp.take(table, labels.astype(jnp.int32), axis=0)


def decode(anchor_image, num_classes: int):
  """Anchor image (..., H, W, 3) in [-1, 1] -> labels (..., H, W) int32, nearest anchor.

  Only the dataset's `num_classes` anchors compete, so every pixel gets a valid class.
  """
  anchors = to_unit_range(palette(num_classes))  # (C, 3)
  x = jnp.asarray(anchor_image, jnp.float32)
  # |x - a|^2 = |x|^2 - 2 x.a + |a|^2; |x|^2 is the same for every anchor, so drop it.
  scores = -2.0 * jnp.einsum("...c,kc->...k", x, anchors) + jnp.sum(anchors**2, axis=-1)
  return jnp.argmin(scores, axis=-1).astype(jnp.int32)


def is_key_batch(rng) -> bool:
  """True for one PRNG key per example ((B,) typed keys or (B, 2) raw keys), False for one key."""
  if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng.ndim == 1
  return rng.ndim == 2


def perturbation_noise(rng, shape):
  """u ~ U[0, 1) elementwise: the randomness of Eq. 14, drawn apart so callers can edit it.

  `rng` is one key for the whole array, or one key per example (leading axis): example i's noise
  then depends on its own key only, not on the batch it is in (evaluation keys it by the
  example's index in the split, so results do not depend on the number of processes).
  """
  if is_key_batch(rng):
    if rng.shape[0] != shape[0]:
      raise ValueError(f"{rng.shape[0]} keys for a batch of {shape[0]} anchor images")
    return jax.vmap(lambda key: jax.random.uniform(key, tuple(shape[1:]), jnp.float32))(rng)
  return jax.random.uniform(rng, tuple(shape), jnp.float32)


def perturb(anchor_image, rng, amplitude: float = DEFAULT_PERTURBATION, noise=None):
  """Eq. 14: anchor + amplitude * (u - 0.5) elementwise, in [-1, 1] units, with
  u = perturbation_noise(rng, shape) (one key, or one key per example), or the given `noise` u
  of the anchor image's shape."""
  if noise is None:
    noise = perturbation_noise(rng, jnp.shape(anchor_image))
  return anchor_image + amplitude * (noise - 0.5)
