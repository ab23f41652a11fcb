"""Linen modules: the velocity UNet and the autoencoders."""

from semflow_jax.models.autoencoder import IdentityAutoencoder
from semflow_jax.models.unet import UNet

__all__ = ["IdentityAutoencoder", "UNet"]
