"""Linen modules: the velocity UNets and the autoencoders."""

from semflow_jax.models.autoencoder import IdentityAutoencoder
from semflow_jax.models.sd_unet import SDUNet, SDUNetConfig
from semflow_jax.models.sd_vae import AutoencoderKL, SDVAEConfig
from semflow_jax.models.unet import UNet

__all__ = ["AutoencoderKL", "IdentityAutoencoder", "SDUNet", "SDUNetConfig", "SDVAEConfig", "UNet"]
