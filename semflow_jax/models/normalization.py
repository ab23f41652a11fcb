"""GroupNorm, optionally followed by a per-example scale and shift (FiLM) and SiLU, as one
operation with a hand-written gradient.

Every UNet block starts with GroupNorm -> (FiLM) -> SiLU. Written as separate ops and
differentiated by JAX, that is a dozen element-wise passes and reductions over the activation
in the backward pass, several of them over a (B, H, W, G, C/G) view whose reductions XLA:CPU
runs slowly, plus stored intermediates. Here the forward is two reductions over the spatial
axes (the mean, then the centred second moment: two-pass, as exact as flax's
`use_fast_variance=False`) and one fused element-wise pass; the backward is one reduction pass
(two sums per example and channel) and one element-wise pass, recomputing the normalised value
from the stored input instead of storing it. This is the formulation PyTorch's native GroupNorm
kernels use. The result equals `nn.GroupNorm` -> `x * (1 + scale) + shift` -> `nn.silu` up to
float rounding.

Statistics and the arithmetic are float32 whatever the input dtype; the output has `dtype`.
"""

import functools
import math
from typing import Any, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


def _channel_stats(x, groups: int, epsilon: float):
  """Per (example, channel) group mean and per (example, group) 1/std; x float32 (B, ..., C)."""
  b, c = x.shape[0], x.shape[-1]
  spatial = tuple(range(1, x.ndim - 1))
  n = math.prod(x.shape[1:-1]) * (c // groups)
  to_channels = lambda per_group: jnp.repeat(per_group, c // groups, axis=1)
  mean = to_channels(jnp.sum(x, axis=spatial).reshape(b, groups, -1).sum(-1) / n)
  centred = x - _expand(mean, x)
  var = jnp.sum(centred * centred, axis=spatial).reshape(b, groups, -1).sum(-1) / n
  return mean, jax.lax.rsqrt(var + epsilon)


def _expand(per_channel, x):
  """(B, C) -> (B, 1, ..., 1, C) against x."""
  return per_channel.reshape(per_channel.shape[0], *(1,) * (x.ndim - 2), per_channel.shape[-1])


def _forward(x, scale, bias, film, groups, epsilon, silu):
  """Returns (output float32, (mean, rstd)); film is None or (scale, shift), each (B, C)."""
  x = x.astype(jnp.float32)
  c = x.shape[-1]
  mean, rstd = _channel_stats(x, groups, epsilon)
  gain = jnp.repeat(rstd, c // groups, axis=1) * scale  # (B, C)
  shift = jnp.broadcast_to(bias, gain.shape)
  if film is not None:
    gain, shift = gain * (1 + film[0]), shift * (1 + film[0]) + film[1]
  z = (x - _expand(mean, x)) * _expand(gain, x) + _expand(shift, x)
  return (z * jax.nn.sigmoid(z) if silu else z), (mean, rstd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def group_norm(x, scale, bias, film: Optional[Tuple[Any, Any]], groups: int, epsilon: float,
               silu: bool, dtype):
  """GroupNorm of x (B, ..., C) with per-channel `scale`, `bias`; then, if given,
  `film = (s, t)` (each (B, C)): y * (1 + s) + t; then SiLU if `silu`."""
  return _forward(x, scale, bias, film, groups, epsilon, silu)[0].astype(dtype)


def _group_norm_fwd(x, scale, bias, film, groups, epsilon, silu, dtype):
  out, (mean, rstd) = _forward(x, scale, bias, film, groups, epsilon, silu)
  return out.astype(dtype), (x, scale, bias, film, mean, rstd)


def _group_norm_bwd(groups, epsilon, silu, dtype, residuals, grad):
  x_in, scale, bias, film, mean, rstd = residuals
  x, g = x_in.astype(jnp.float32), grad.astype(jnp.float32)
  b, c = x.shape[0], x.shape[-1]
  spatial = tuple(range(1, x.ndim - 1))
  n = math.prod(x.shape[1:-1]) * (c // groups)
  rstd_c = jnp.repeat(rstd, c // groups, axis=1)
  film_gain = 1 + film[0] if film is not None else jnp.ones((b, c), jnp.float32)
  # Recompute the normalised input and, for SiLU, its argument: cheaper than storing them.
  xhat = (x - _expand(mean, x)) * _expand(rstd_c, x)
  if silu:
    z = xhat * _expand(scale * film_gain, x) + _expand(bias * film_gain + (
        film[1] if film is not None else 0), x)
    sig = jax.nn.sigmoid(z)
    g = g * sig * (1 + z * (1 - sig))
  # The two sums everything else follows from, per example and channel.
  sum_g = jnp.sum(g, axis=spatial)
  sum_g_xhat = jnp.sum(g * xhat, axis=spatial)
  grad_scale = jnp.sum(film_gain * sum_g_xhat, axis=0)
  grad_bias = jnp.sum(film_gain * sum_g, axis=0)
  grad_film = None
  if film is not None:
    grad_film = (scale * sum_g_xhat + bias * sum_g, sum_g)
  # d/dxhat = g * scale * (1 + s); GroupNorm's backward over each group of n values.
  k = scale * film_gain  # (B, C)
  group_mean = lambda v: jnp.repeat(v.reshape(b, groups, -1).sum(-1) / n, c // groups, axis=1)
  m1, m2 = group_mean(k * sum_g), group_mean(k * sum_g_xhat)
  grad_x = _expand(rstd_c, x) * (g * _expand(k, x) - _expand(m1, x) - xhat * _expand(m2, x))
  grad_film = None if film is None else tuple(f.astype(v.dtype)
                                              for f, v in zip(grad_film, film))
  return (grad_x.astype(x_in.dtype), grad_scale.astype(scale.dtype),
          grad_bias.astype(bias.dtype), grad_film)


group_norm.defvjp(_group_norm_fwd, _group_norm_bwd)


class GroupNorm(nn.Module):
  """Drop-in for `nn.GroupNorm` (same parameters `scale`, `bias`, float32) that can also apply
  FiLM and SiLU in the same operation: `GroupNorm(...)(x, film=(s, t), silu=True)`."""
  num_groups: int
  epsilon: float = 1e-6
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, film=None, silu: bool = False):
    c = x.shape[-1]
    if c % self.num_groups:
      raise ValueError(f"{self.name}: {c} channels do not split into {self.num_groups} groups")
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    if film is not None:
      film = tuple(jnp.asarray(f, jnp.float32) for f in film)
    return group_norm(x, scale, bias, film, self.num_groups, self.epsilon, silu,
                      self.dtype or x.dtype)
