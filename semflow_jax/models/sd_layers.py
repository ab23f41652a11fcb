"""Building blocks shared by the Stable Diffusion UNet and VAE, in NHWC.

Submodule names follow diffusers' attribute names (`norm1`, `conv1`, `to_q`, `to_out_0`, ...)
so that a PyTorch state-dict key maps onto a Flax parameter path by a mechanical rename; see
`semflow_jax.convert`. `dtype` is the compute dtype; parameters stay float32 (`param_dtype`),
normalisation statistics and the attention softmax are computed in float32 whatever `dtype` is.
"""

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from semflow_jax.models.normalization import GroupNorm

Dtype = Any


def group_norm(groups: int, eps: float, dtype: Dtype, name: str) -> GroupNorm:
  """nn.GroupNorm's parameters and two-pass statistics (E[x^2] - E[x]^2 loses digits on the
  large activations of deep UNets); call it with `silu=True` to apply SiLU in the same op."""
  return GroupNorm(num_groups=groups, epsilon=eps, dtype=dtype, name=name)


def conv(features: int, kernel: int, dtype: Dtype, name: str, stride: int = 1,
         padding: Optional[int] = None) -> nn.Conv:
  pad = (kernel - 1) // 2 if padding is None else padding
  return nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                 padding=((pad, pad), (pad, pad)), dtype=dtype, name=name)


def timestep_embedding(timesteps, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0):
  """diffusers' `get_timestep_embedding`: (B,) timesteps -> (B, dim) sinusoids."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  args = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None]
  sin, cos = jnp.sin(args), jnp.cos(args)
  emb = jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedding(nn.Module):
  features: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(self.features, dtype=self.dtype, name="linear_1")(x)
    return nn.Dense(self.features, dtype=self.dtype, name="linear_2")(nn.silu(x))


class ResnetBlock2D(nn.Module):
  """Pre-norm residual block; the time embedding (if any) is added after the first conv."""
  out_channels: int
  groups: int
  eps: float
  output_scale_factor: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, temb=None):
    h = group_norm(self.groups, self.eps, self.dtype, "norm1")(x, silu=True)
    h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
    if temb is not None:
      h = h + nn.Dense(self.out_channels, dtype=self.dtype,
                       name="time_emb_proj")(nn.silu(temb))[:, None, None, :]
    h = group_norm(self.groups, self.eps, self.dtype, "norm2")(h, silu=True)
    h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
    out = x + h
    return out / self.output_scale_factor if self.output_scale_factor != 1.0 else out


def attend(x, context, heads: int, dim_head: int, qkv_bias: bool, dtype: Dtype):
  """Multi-head attention of tokens x (B, T, C) over context (B, S, D) -> (B, T, C).

  Creates `to_q`, `to_k`, `to_v`, `to_out_0` in the calling module's scope (diffusers' layout).
  """
  inner = heads * dim_head

  def project(y, name):
    y = nn.Dense(inner, use_bias=qkv_bias, dtype=dtype, name=name)(y)
    return y.reshape(*y.shape[:2], heads, dim_head)

  q, k, v = project(x, "to_q"), project(context, "to_k"), project(context, "to_v")
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * (dim_head ** -0.5), axis=-1).astype(v.dtype)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(*x.shape[:2], inner)
  return nn.Dense(x.shape[-1], dtype=dtype, name="to_out_0")(out)


class Attention(nn.Module):
  """Attention of tokens (B, T, C) over themselves or over `context` (B, S, D)."""
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context=None):
    return attend(x, x if context is None else context, self.heads, self.dim_head,
                  qkv_bias=False, dtype=self.dtype)


class SpatialSelfAttention(nn.Module):
  """The VAE's mid-block attention: GroupNorm, one head over all pixels, residual."""
  groups: int
  eps: float
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = group_norm(self.groups, self.eps, self.dtype, "group_norm")(x).reshape(b, h * w, c)
    y = attend(y, y, heads=1, dim_head=c, qkv_bias=True, dtype=self.dtype)
    return x + y.reshape(b, h, w, c)


def gelu(x):
  """Exact GELU as PyTorch computes it, x (1 + erf(x / sqrt 2)) / 2. (`nn.gelu(approximate=
  False)` goes through erfc, which XLA:CPU evaluates 2.5x slower; the two differ by rounding.)"""
  return 0.5 * x * (1 + jax.lax.erf(x * (2 ** -0.5)))


class GEGLU(nn.Module):
  """`proj` gives a value and a gate; the output is value * GELU(gate) (exact GELU)."""
  inner: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    value, gate = jnp.split(nn.Dense(2 * self.inner, dtype=self.dtype, name="proj")(x), 2, axis=-1)
    return value * gelu(gate)


class FeedForward(nn.Module):
  """diffusers' FeedForward with GEGLU: `net_0` (GEGLU), `net_2` (projection back)."""
  mult: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    h = GEGLU(x.shape[-1] * self.mult, self.dtype, name="net_0")(x)
    return nn.Dense(x.shape[-1], dtype=self.dtype, name="net_2")(h)


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention to `context`, feed-forward; each pre-LayerNorm, residual."""
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    def norm(name):
      return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)

    x = x + Attention(self.heads, self.dim_head, dtype=self.dtype, name="attn1")(norm("norm1")(x))
    x = x + Attention(self.heads, self.dim_head, dtype=self.dtype,
                      name="attn2")(norm("norm2")(x), context)
    return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2D(nn.Module):
  """diffusers' Transformer2DModel on continuous NHWC input, 1x1-conv or linear projections."""
  heads: int
  dim_head: int
  num_layers: int
  groups: int
  use_linear_projection: bool
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, context):
    b, h, w, c = x.shape
    inner = self.heads * self.dim_head
    y = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
    if self.use_linear_projection:
      y = nn.Dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))
    else:
      y = conv(inner, 1, self.dtype, "proj_in")(y).reshape(b, h * w, inner)
    for i in range(self.num_layers):
      y = BasicTransformerBlock(self.heads, self.dim_head, self.dtype,
                                name=f"transformer_blocks_{i}")(y, context)
    if self.use_linear_projection:
      y = nn.Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
    else:
      y = conv(c, 1, self.dtype, "proj_out")(y.reshape(b, h, w, inner))
    return x + y


def upsample_nearest(x):
  return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


class Upsample2D(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv (`conv`)."""
  channels: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    return conv(self.channels, 3, self.dtype, "conv")(upsample_nearest(x))


class Downsample2D(nn.Module):
  """Stride-2 3x3 conv (`conv`). padding=0 is the VAE's variant: pad right and bottom by one."""
  channels: int
  padding: int = 1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    if self.padding == 0:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return conv(self.channels, 3, self.dtype, "conv", stride=2, padding=self.padding)(x)
