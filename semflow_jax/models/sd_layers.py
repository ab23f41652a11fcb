"""Building blocks shared by the Stable Diffusion UNet and VAE, in NHWC.

Submodule names follow diffusers' attribute names (`norm1`, `conv1`, `to_q`, `to_out_0`, ...)
so that a PyTorch state-dict key maps onto a Flax parameter path by a mechanical rename; see
`semflow_jax.convert`. `dtype` is the compute dtype; parameters stay float32 (`param_dtype`),
normalisation statistics and the attention softmax are computed in float32 whatever `dtype` is.
"""

import contextlib
import dataclasses
import functools
import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


def shard_batch(x, mesh: Optional[Mesh]):
  """`x` with its leading (batch) dimension split over every axis of `mesh`, the rest whole.

  Between blocks (as MaxText and maxdiffusion constrain activations): the weights are what
  moves (FSDP all-gathers them per layer), never the activations, and XLA's partitioner has no
  layout to guess. No-op without a mesh, on one device, or for a batch that does not split.
  """
  if mesh is None or mesh.devices.size == 1 or x.shape[0] % mesh.devices.size:
    return x
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(mesh.axis_names)))


# -- attention -----------------------------------------------------------------------------------
ATTENTION_KINDS = ("auto", "einsum", "dot_product", "splash")
# auto on TPU: the splash kernel from this many query tokens on. Below it the float32 logits of
# one example are at most heads x 1024^2 x 4 bytes (32 MiB for SD's 8 heads), which XLA's fused
# softmax handles; above it they dominate activation memory (512 MiB per example at 64x64
# latents). The kernel needs query and key lengths divisible by its 128-token blocks.
SPLASH_MIN_TOKENS = 1024
SPLASH_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class AttentionImpl:
  """How `attend` computes softmax(q k^T / sqrt(d)) v; the kernel is picked per layer.

  kind: 'einsum' (explicit float32 logits: the reference, and the fastest on XLA:CPU),
  'dot_product' (`jax.nn.dot_product_attention`: cuDNN's fused kernel on GPU where it takes the
  shapes and dtype, XLA elsewhere), 'splash' (the Pallas TPU flash kernel, for layers whose
  lengths fit its blocks; the others, e.g. cross-attention over 77 text tokens, use
  'dot_product'), or 'auto' (splash on TPU from SPLASH_MIN_TOKENS query tokens, dot_product on
  GPU, einsum on CPU). `platform` is the one the program is compiled for (a TPU topology's when
  planning on a CPU) and `mesh` the devices it runs on: a Pallas kernel cannot be partitioned
  by XLA, so it runs per device under `shard_map` over the batch, split over all mesh axes.
  """
  kind: str = "einsum"
  platform: str = "cpu"
  mesh: Optional[Mesh] = None

  def __post_init__(self):
    if self.kind not in ATTENTION_KINDS:
      raise ValueError(f"config.model.attention={self.kind!r}: expected one of {ATTENTION_KINDS}")
    if self.kind == "splash" and self.platform != "tpu":
      raise ValueError(f"config.model.attention='splash' is a TPU kernel; this program is for "
                       f"{self.platform} (use 'auto')")

  def kernel(self, batch: int, q_len: int, kv_len: int) -> str:
    """The implementation one layer uses: 'einsum', 'dot_product' or 'splash'."""
    kind = self.kind
    if kind == "auto":
      if self.platform == "tpu":
        kind = "splash" if q_len >= SPLASH_MIN_TOKENS else "dot_product"
      else:
        kind = "dot_product" if self.platform == "gpu" else "einsum"
    if kind == "splash" and not self._splash_fits(batch, q_len, kv_len):
      kind = "dot_product"
    return kind

  def _splash_fits(self, batch, q_len, kv_len):
    shards = 1 if self.mesh is None else self.mesh.devices.size
    return q_len % SPLASH_BLOCK == 0 and kv_len % SPLASH_BLOCK == 0 and batch % shards == 0


# Trace-time record of the attention layers of a program (the planner and tests read it).
_RECORDERS = []


@contextlib.contextmanager
def record_attention():
  """Collects one dict per `attend` call traced inside the block: shapes and kernel."""
  calls = []
  _RECORDERS.append(calls)
  try:
    yield calls
  finally:
    _RECORDERS.remove(calls)


def einsum_attention(q, k, v):
  """(B, T, H, D), (B, S, H, D) x2 -> (B, T, H, D) with float32 logits and softmax."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  weights = jax.nn.softmax(logits * (q.shape[-1] ** -0.5), axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


def dot_product_attention(q, k, v, platform: str):
  """jax.nn.dot_product_attention (float32 logits): cuDNN on GPU when it takes the call."""
  if platform == "gpu" and q.dtype in (jnp.bfloat16, jnp.float16):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (NotImplementedError, ValueError, RuntimeError):
      pass  # head dim, dtype or cuDNN version it does not support: XLA below
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, q_len: int, kv_len: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu.splash_attention import (
      splash_attention_kernel as splash, splash_attention_mask as mask_lib)
  bq, bkv = (max(b for b in (512, 256, 128) if n % b == 0) for n in (q_len, kv_len))
  blocks = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq,
                             block_kv_dkv=bkv, block_kv_dkv_compute=bkv, block_q_dq=bq,
                             block_kv_dq=bkv)
  mask = mask_lib.MultiHeadMask([mask_lib.FullMask((q_len, kv_len))] * heads)
  return splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks,
                                interpret=interpret)


def splash_attention(q, k, v, mesh: Optional[Mesh] = None, interpret: bool = False):
  """The Pallas TPU splash kernel on (B, T, H, D) inputs, per device over `mesh`'s batch split.

  `interpret=True` runs the kernel's Python semantics on any backend (for tests on a CPU).
  """
  _, q_len, heads, dim = q.shape
  kernel = _splash_kernel(heads, q_len, k.shape[1], interpret)

  def per_device(q, k, v):
    to_heads_first = lambda y: y.swapaxes(1, 2)  # the kernel takes (H, T, D) per example
    out = jax.vmap(kernel)(to_heads_first(q * jnp.asarray(dim ** -0.5, q.dtype)),
                           to_heads_first(k), to_heads_first(v))
    return out.swapaxes(1, 2)  # pyright: ignore[reportAttributeAccessIssue]

  if mesh is None:
    return per_device(q, k, v)
  batch = P(mesh.axis_names)
  # check_vma=False: the kernel's outputs carry no varying-axes annotation of their own.
  return jax.shard_map(per_device, mesh=mesh, in_specs=(batch, batch, batch), out_specs=batch,
                       check_vma=False)(q, k, v)


def attend(x, context, heads: int, dim_head: int, qkv_bias: bool, dtype: Dtype,
           impl: AttentionImpl = AttentionImpl()):
  """Multi-head attention of tokens x (B, T, C) over context (B, S, D) -> (B, T, C).

  Creates `to_q`, `to_k`, `to_v`, `to_out_0` in the calling module's scope (diffusers' layout).
  """
  inner = heads * dim_head

  def project(y, name):
    y = nn.Dense(inner, use_bias=qkv_bias, dtype=dtype, name=name)(y)
    return shard_batch(y.reshape(*y.shape[:2], heads, dim_head), impl.mesh)

  q, k, v = project(x, "to_q"), project(context, "to_k"), project(context, "to_v")
  kernel = impl.kernel(q.shape[0], q.shape[1], k.shape[1])
  for calls in _RECORDERS:
    calls.append(dict(batch=q.shape[0], q_len=q.shape[1], kv_len=k.shape[1], heads=heads,
                      dim_head=dim_head, kernel=kernel))
  if kernel == "splash":
    out = splash_attention(q, k, v, impl.mesh)
  elif kernel == "dot_product":
    out = dot_product_attention(q, k, v, impl.platform)
  else:
    out = einsum_attention(q, k, v)
  return nn.Dense(x.shape[-1], dtype=dtype, name="to_out_0")(out.reshape(*x.shape[:2], inner))


class _MultiHead(nn.Module):
  """The fields of the modules made of attention layers: `heads` x `dim_head` channels, the
  compute dtype and the kernel choice."""
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  attention: AttentionImpl = AttentionImpl()


class Attention(_MultiHead):
  """Attention of tokens (B, T, C) over themselves or over `context` (B, S, D)."""

  @nn.compact
  def __call__(self, x, context=None):
    return attend(x, x if context is None else context, self.heads, self.dim_head,
                  qkv_bias=False, dtype=self.dtype, impl=self.attention)


class SpatialSelfAttention(nn.Module):
  """The VAE's mid-block attention: GroupNorm, one head over all pixels, residual."""
  groups: int
  eps: float
  dtype: Dtype = jnp.float32
  attention: AttentionImpl = AttentionImpl()

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    y = group_norm(self.groups, self.eps, self.dtype, "group_norm")(x).reshape(b, h * w, c)  # pyright: ignore[reportAttributeAccessIssue]
    y = attend(y, y, heads=1, dim_head=c, qkv_bias=True, dtype=self.dtype, impl=self.attention)
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


class BasicTransformerBlock(_MultiHead):
  """Self-attention, cross-attention to `context`, feed-forward; each pre-LayerNorm, residual."""

  @nn.compact
  def __call__(self, x, context):
    def norm(name):
      return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, use_fast_variance=False, name=name)

    attn = functools.partial(Attention, self.heads, self.dim_head, self.dtype, self.attention)
    x = x + attn(name="attn1")(norm("norm1")(x))
    x = x + attn(name="attn2")(norm("norm2")(x), context)
    return x + FeedForward(dtype=self.dtype, name="ff")(norm("norm3")(x))


class Transformer2D(nn.Module):
  """diffusers' Transformer2DModel on continuous NHWC input, 1x1-conv or linear projections."""
  heads: int
  dim_head: int
  num_layers: int
  groups: int
  use_linear_projection: bool
  dtype: Dtype = jnp.float32
  attention: AttentionImpl = AttentionImpl()

  @nn.compact
  def __call__(self, x, context):
    b, h, w, c = x.shape
    inner = self.heads * self.dim_head
    y = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
    if self.use_linear_projection:
      y = nn.Dense(inner, dtype=self.dtype, name="proj_in")(y.reshape(b, h * w, c))  # pyright: ignore[reportAttributeAccessIssue]
    else:
      y = conv(inner, 1, self.dtype, "proj_in")(y).reshape(b, h * w, inner)
    for i in range(self.num_layers):
      y = BasicTransformerBlock(self.heads, self.dim_head, self.dtype, attention=self.attention,
                                name=f"transformer_blocks_{i}")(y, context)
    if self.use_linear_projection:
      y = nn.Dense(c, dtype=self.dtype, name="proj_out")(y).reshape(b, h, w, c)
    else:
      y = conv(c, 1, self.dtype, "proj_out")(y.reshape(b, h, w, inner))
    return x + y


def upsample_nearest(x):
  """(B, H, W, C) -> (B, 2H, 2W, C), each pixel repeated 2x2."""
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
