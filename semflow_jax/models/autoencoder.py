"""Autoencoders that map images in [-1, 1] to flow latents. `identity` runs the flow in pixel
space (small images, CPU runs); the SD-1.5 AutoencoderKL plugs in behind the same interface:
`encode(x) -> (mean, logvar)` and `decode(z) -> x` through `module.apply(..., method=...)`.
"""

import flax.linen as nn
import jax.numpy as jnp


class IdentityAutoencoder(nn.Module):
  """Latent = image. Zero log-variance keeps the posterior-sampling code path uniform."""
  scaling_factor: float = 1.0

  def __call__(self, x):
    return self.decode(self.encode(x)[0])

  def encode(self, x):
    return x, jnp.full_like(x, -jnp.inf)

  def decode(self, z):
    return z

  def latent_shape(self, image_shape):
    return tuple(image_shape)
