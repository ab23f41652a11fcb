"""Stable Diffusion's VAE (diffusers' `AutoencoderKL`) as a Linen module.

`encode(x)` maps images in [-1, 1] (NHWC) to the posterior mean and log-variance (clamped to
[-30, 20] as diffusers does); `decode(z)` maps latents back. Both are plain methods usable
through `module.apply({"params": p}, x, method="encode")`. The scaling factor (0.18215 for
SD-1.5) is applied by the caller, `SemFlow`, not here, exactly as in diffusers.
"""

import dataclasses
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax.numpy as jnp
from absl import logging

from semflow_jax.models import sd_layers as L

_FIXED = {"act_fn": "silu", "latents_mean": None, "latents_std": None}
_IGNORED = {"sample_size", "force_upcast"}


@dataclasses.dataclass(frozen=True)
class SDVAEConfig:
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  scaling_factor: float = 0.18215
  shift_factor: Optional[float] = None
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  mid_block_add_attention: bool = True

  @classmethod
  def from_diffusers(cls, config: dict, source: str = "vae config") -> "SDVAEConfig":
    for key, default in _FIXED.items():
      if config.get(key, default) != default:
        raise ValueError(f"{source}: {key}={config[key]!r} is not supported (only {default!r})")
    n = len(config.get("block_out_channels", cls.block_out_channels))
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"),
                         ("up_block_types", "UpDecoderBlock2D")):
      types = config.get(key, [allowed] * n)
      if len(types) != n or any(t != allowed for t in types):
        raise ValueError(f"{source}: {key}={types} not supported: expected {n} x {allowed!r}")
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = [k for k in config if not k.startswith("_") and k not in fields and k not in _FIXED
               and k not in _IGNORED and k not in ("down_block_types", "up_block_types")]
    if unknown:
      logging.warning("%s: ignoring keys %s", source, unknown)
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()
                  if k in fields})

  def to_diffusers(self) -> dict:
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}
    n = len(self.block_out_channels)
    d["down_block_types"] = ["DownEncoderBlock2D"] * n
    d["up_block_types"] = ["UpDecoderBlock2D"] * n
    return d


class _MidBlock(nn.Module):
  channels: int
  groups: int
  add_attention: bool
  dtype: Any
  attention: L.AttentionImpl = L.AttentionImpl()

  @nn.compact
  def __call__(self, h):
    h = L.ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name="resnets_0")(h)
    if self.add_attention:
      h = L.SpatialSelfAttention(self.groups, 1e-6, self.dtype, attention=self.attention,
                                 name="attentions_0")(h)
    return L.ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name="resnets_1")(h)


class _ResnetStack(nn.Module):
  """DownEncoderBlock2D / UpDecoderBlock2D: `resnets_j`, then an optional resampler."""
  channels: int
  num_layers: int
  groups: int
  resample: Optional[str]   # 'down', 'up' or None
  dtype: Any

  @nn.compact
  def __call__(self, h):
    for j in range(self.num_layers):
      h = L.ResnetBlock2D(self.channels, self.groups, 1e-6, dtype=self.dtype, name=f"resnets_{j}")(h)
    if self.resample == "down":
      h = L.Downsample2D(self.channels, padding=0, dtype=self.dtype, name="downsamplers_0")(h)
    elif self.resample == "up":
      h = L.Upsample2D(self.channels, self.dtype, name="upsamplers_0")(h)
    return h


class _Coder(nn.Module):
  """What diffusers' Encoder and Decoder share: their fields and the layers they both have."""
  config: SDVAEConfig
  dtype: Any = jnp.float32
  attention: L.AttentionImpl = L.AttentionImpl()

  def mid_block(self, h):
    cfg = self.config
    return _MidBlock(cfg.block_out_channels[-1], cfg.norm_num_groups, cfg.mid_block_add_attention,
                     self.dtype, attention=self.attention, name="mid_block")(h)

  def stacks(self, h, resample: str, channels, num_layers: int):
    """`<resample>_blocks_i` of `channels[i]`, each resampling but the last."""
    for i, c in enumerate(channels):
      h = _ResnetStack(c, num_layers, self.config.norm_num_groups,
                       resample if i < len(channels) - 1 else None, self.dtype,
                       name=f"{resample}_blocks_{i}")(h)
    return h

  def output(self, h, channels: int):
    """`conv_norm_out` (GroupNorm + SiLU), then `conv_out` to `channels`."""
    h = L.group_norm(self.config.norm_num_groups, 1e-6, self.dtype, "conv_norm_out")(h, silu=True)
    return L.conv(channels, 3, self.dtype, "conv_out")(h)


class Encoder(_Coder):
  @nn.compact
  def __call__(self, x):
    cfg, dt = self.config, self.dtype
    h = L.conv(cfg.block_out_channels[0], 3, dt, "conv_in")(x.astype(dt))
    h = self.stacks(h, "down", cfg.block_out_channels, cfg.layers_per_block)
    return self.output(self.mid_block(h), 2 * cfg.latent_channels)


class Decoder(_Coder):
  @nn.compact
  def __call__(self, z):
    cfg, dt = self.config, self.dtype
    h = L.conv(cfg.block_out_channels[-1], 3, dt, "conv_in")(z.astype(dt))
    h = self.stacks(self.mid_block(h), "up", cfg.block_out_channels[::-1],
                    cfg.layers_per_block + 1)
    return self.output(h, cfg.out_channels)


class AutoencoderKL(nn.Module):
  """encode: images (B, H, W, 3) in [-1, 1] -> (mean, logvar) (B, H/f, W/f, latent_channels);
  decode: latents -> images. f = 2 ** (len(block_out_channels) - 1). `attention` picks the
  mid-block attention's kernel (sd_layers.AttentionImpl)."""
  config: SDVAEConfig
  dtype: Any = jnp.float32
  attention: L.AttentionImpl = L.AttentionImpl()

  def setup(self):
    cfg = self.config
    self.encoder = Encoder(cfg, self.dtype, self.attention)
    self.decoder = Decoder(cfg, self.dtype, self.attention)
    if cfg.use_quant_conv:
      self.quant_conv = L.conv(2 * cfg.latent_channels, 1, self.dtype, "quant_conv")
    if cfg.use_post_quant_conv:
      self.post_quant_conv = L.conv(cfg.latent_channels, 1, self.dtype, "post_quant_conv")

  def __call__(self, x):
    """Reconstruction from the posterior mean (also what `init` traces to create every param)."""
    return self.decode(self.encode(x)[0])

  def encode(self, x):
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return mean, jnp.clip(logvar, -30.0, 20.0)

  def decode(self, z):
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z.astype(self.dtype))
    return self.decoder(z).astype(jnp.float32)

  @property
  def scaling_factor(self) -> float:
    return self.config.scaling_factor

  @property
  def shift_factor(self) -> float:
    return self.config.shift_factor or 0.0

  def latent_shape(self, image_shape):
    f = 2 ** (len(self.config.block_out_channels) - 1)
    h, w, _ = image_shape
    if h % f or w % f:
      raise ValueError(f"image size {h}x{w} is not divisible by the VAE's downsampling factor {f}")
    return (h // f, w // f, self.config.latent_channels)
