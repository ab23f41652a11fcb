"""A compact Linen UNet for pixel-space SemFlow: timestep embedding, residual blocks with
GroupNorm, self-attention at low resolution. NHWC in, NHWC out. Sizes come from config.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from semflow_jax.models.normalization import GroupNorm
from semflow_jax.models.sd_layers import timestep_embedding, upsample_nearest


class ResBlock(nn.Module):
  channels: int
  groups: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, temb, deterministic=True):
    dt = self.dtype
    h = GroupNorm(self.groups, dtype=dt, name="norm1")(x, silu=True)
    h = nn.Conv(self.channels, (3, 3), dtype=dt, name="conv1")(h)
    # Time conditioning as a per-channel scale and shift (FiLM) after the second norm.
    scale_shift = nn.Dense(2 * self.channels, dtype=dt, name="time_proj")(nn.swish(temb))
    film = jnp.split(scale_shift, 2, axis=-1)
    h = GroupNorm(self.groups, dtype=dt, name="norm2")(h, film=film, silu=True)
    h = nn.Dropout(self.dropout)(h, deterministic=deterministic)
    h = nn.Conv(self.channels, (3, 3), dtype=dt, name="conv2",
                kernel_init=nn.initializers.zeros_init())(h)
    if x.shape[-1] != self.channels:
      x = nn.Conv(self.channels, (1, 1), dtype=dt, name="skip")(x)
    return x + h


class SelfAttention(nn.Module):
  num_heads: int
  groups: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = GroupNorm(self.groups, dtype=self.dtype, name="norm")(x).reshape(b, h * w, c)  # pyright: ignore[reportAttributeAccessIssue]
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, name="attn",
        out_kernel_init=nn.initializers.zeros_init())(y, y)
    return x + y.reshape(b, h, w, c)


class UNet(nn.Module):
  """Predicts dz/dt from z_t (B, H, W, C) and timesteps (B,) on the 0..1000 scale."""
  out_channels: int
  base_channels: int = 64
  channel_mult: Sequence[int] = (1, 2, 2)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (8,)
  num_heads: int = 4
  groups: int = 16
  dropout: float = 0.0
  # Space-to-depth factor at the input (and depth-to-space at the output): a 2 runs every
  # level at half resolution for a quarter of the FLOPs, which is what CPUs need.
  patch_size: int = 1
  dtype: Any = jnp.float32   # compute dtype; parameters stay float32
  remat: bool = False        # recompute ResBlocks in the backward pass

  @nn.compact
  def __call__(self, x, timesteps, deterministic=True):
    p, dt = self.patch_size, self.dtype
    # deterministic (argument 3, counting self) is a Python bool: static under remat.
    res_block = nn.remat(ResBlock, static_argnums=(3,)) if self.remat else ResBlock
    b, height, width, _ = x.shape
    if height % p or width % p:
      raise ValueError(f"input {height}x{width} is not divisible by patch_size {p}")
    x = _space_to_depth(x.astype(dt), p)
    temb_dim = 4 * self.base_channels
    # Sinusoids of (B,) timesteps on the 0..1000 scale, cos first.
    temb = timestep_embedding(timesteps, self.base_channels, flip_sin_to_cos=True, freq_shift=0)
    temb = nn.Dense(temb_dim, dtype=dt, name="time_mlp_0")(temb)
    temb = nn.Dense(temb_dim, dtype=dt, name="time_mlp_1")(nn.swish(temb))

    h = nn.Conv(self.base_channels, (3, 3), dtype=dt, name="conv_in")(x)
    skips = [h]
    for level, mult in enumerate(self.channel_mult):
      for i in range(self.num_res_blocks):
        h = res_block(self.base_channels * mult, self.groups, self.dropout, dt,
                      name=f"down_{level}_res_{i}")(h, temb, deterministic)
        if h.shape[1] in self.attention_resolutions:
          h = SelfAttention(self.num_heads, self.groups, dt, name=f"down_{level}_attn_{i}")(h)
        skips.append(h)
      if level < len(self.channel_mult) - 1:
        h = nn.Conv(h.shape[-1], (3, 3), strides=(2, 2), dtype=dt,
                    name=f"down_{level}_downsample")(h)
        skips.append(h)

    channels = h.shape[-1]
    h = res_block(channels, self.groups, self.dropout, dt, name="mid_res_0")(h, temb, deterministic)
    h = SelfAttention(self.num_heads, self.groups, dt, name="mid_attn")(h)
    h = res_block(channels, self.groups, self.dropout, dt, name="mid_res_1")(h, temb, deterministic)

    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res_block(self.base_channels * mult, self.groups, self.dropout, dt,
                      name=f"up_{level}_res_{i}")(h, temb, deterministic)
        if h.shape[1] in self.attention_resolutions:
          h = SelfAttention(self.num_heads, self.groups, dt, name=f"up_{level}_attn_{i}")(h)
      if level > 0:
        h = nn.Conv(h.shape[-1], (3, 3), dtype=dt, name=f"up_{level}_upsample")(
            upsample_nearest(h))

    h = GroupNorm(self.groups, dtype=dt, name="norm_out")(h, silu=True)
    h = nn.Conv(self.out_channels * p * p, (3, 3), dtype=dt, name="conv_out",
                kernel_init=nn.initializers.zeros_init())(h)
    return _depth_to_space(h, p).astype(jnp.float32)


def _space_to_depth(x, p: int):
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def _depth_to_space(x, p: int):
  if p == 1:
    return x
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, p, p, c // (p * p)).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, c // (p * p))
