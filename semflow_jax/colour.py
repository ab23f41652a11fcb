"""sRGB <-> CIE L*a*b* (D65) and colour transfer by Lab statistics. Pure math, no I/O.

Colour transfer (Reinhard et al. 2001, the variant IIDM uses for style references) shifts and
scales each Lab channel of an image so that its mean and standard deviation over the image
equal the reference's. Lab separates lightness from the two colour-opponent axes and is close
to perceptually uniform, so matching its moments moves the palette without the hue shifts that
matching RGB channels independently produces.
"""

import jax.numpy as jnp
import numpy as np

# sRGB (linear, D65) -> XYZ, IEC 61966-2-1; its inverse is computed, not typed in. numpy, so
# importing this module does not start a JAX backend.
_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                         [0.2126729, 0.7151522, 0.0721750],
                         [0.0193339, 0.1191920, 0.9503041]], np.float32)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ).astype(np.float32)
_WHITE_D65 = np.array([0.95047, 1.0, 1.08883], np.float32)
_DELTA = 6.0 / 29.0


def _to_linear(srgb):
  return jnp.where(srgb <= 0.04045, srgb / 12.92, ((srgb + 0.055) / 1.055) ** 2.4)


def _to_srgb(linear):
  linear = jnp.maximum(linear, 0.0)
  return jnp.where(linear <= 0.0031308, 12.92 * linear,
                   1.055 * linear ** (1.0 / 2.4) - 0.055)


def rgb_to_lab(rgb):
  """sRGB in [0, 1] (..., 3) -> L* in [0, 100], a*, b* (..., 3)."""
  xyz = jnp.einsum("ij,...j->...i", _RGB_TO_XYZ, _to_linear(jnp.asarray(rgb, jnp.float32)))
  t = xyz / _WHITE_D65
  f = jnp.where(t > _DELTA**3, jnp.cbrt(t), t / (3 * _DELTA**2) + 4.0 / 29.0)
  return jnp.stack([116.0 * f[..., 1] - 16.0, 500.0 * (f[..., 0] - f[..., 1]),
                    200.0 * (f[..., 1] - f[..., 2])], axis=-1)


def lab_to_rgb(lab):
  """L*a*b* (..., 3) -> sRGB (..., 3), not clipped (out-of-gamut colours fall outside [0, 1])."""
  lab = jnp.asarray(lab, jnp.float32)
  fy = (lab[..., 0] + 16.0) / 116.0
  f = jnp.stack([fy + lab[..., 1] / 500.0, fy, fy - lab[..., 2] / 200.0], axis=-1)
  t = jnp.where(f > _DELTA, f**3, 3 * _DELTA**2 * (f - 4.0 / 29.0))
  return _to_srgb(jnp.einsum("ij,...j->...i", _XYZ_TO_RGB, t * _WHITE_D65))


def transfer(images, references, eps: float = 1e-3):
  """Images and references in [-1, 1] (B, H, W, 3) -> images whose per-image Lab channel means
  and standard deviations are the references'; clipped to [-1, 1]."""
  lab = rgb_to_lab((images + 1.0) / 2.0)
  ref = rgb_to_lab((jnp.asarray(references, jnp.float32) + 1.0) / 2.0)
  axes = (1, 2)
  mean, std = lab.mean(axes, keepdims=True), lab.std(axes, keepdims=True)
  ref_mean, ref_std = ref.mean(axes, keepdims=True), ref.std(axes, keepdims=True)
  matched = (lab - mean) * (ref_std / jnp.maximum(std, eps)) + ref_mean
  return jnp.clip(lab_to_rgb(matched) * 2.0 - 1.0, -1.0, 1.0)
