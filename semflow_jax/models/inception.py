"""pytorch-fid's FID network (InceptionV3, `pt_inception-2015-12-05` weights) as a Linen module.

FID means what papers mean only when it is computed with this exact network: the 2015 TensorFlow
Inception graph that pytorch-fid ports to PyTorch. It differs from torchvision's InceptionV3 in
its weights and in three places in the blocks (`FIDInceptionA/C/E` below): the average pools in
the A, C and first E blocks leave the zero padding out of the mean (TensorFlow's behaviour), and
the last E block max-pools where torchvision average-pools. The features are the 2048-d output
of the final average pool ("pool3").

Inputs as pytorch-fid feeds them: uint8 images -> [0, 1] -> bilinear resize to 299x299
(`align_corners=False`, no antialiasing, i.e. `torch.nn.functional.interpolate`) -> [-1, 1].
`fid_input` does exactly that; `InceptionV3` takes its output (NHWC).

Weights: download pytorch-fid's release file once,
  https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
and convert it with `python -m semflow_jax.convert_eval_nets --inception=<that file> --output=DIR`;
evaluation reads it from `config.eval.fid_weights=DIR` (see semflow_jax/convert_eval_nets.py).
Parameter names follow the PyTorch state dict (`Mixed_6e/branch7x7dbl_3/conv/kernel` is
`Mixed_6e.branch7x7dbl_3.conv.weight`), so conversion is a mechanical rename and transpose.

Math only: no I/O. Convolutions default to full float32 precision (`lax.Precision.HIGHEST`) so
that a TPU computes the same features as the float32 PyTorch reference.
"""

import functools
from typing import Any, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

INPUT_SIZE = 299
FEATURES = 2048

Precision = Union[None, str, jax.lax.Precision]
_Pad = Union[int, Tuple[int, int]]


# -- input: pytorch-fid's resize and normalisation -------------------------------------------------
@functools.lru_cache(maxsize=32)
def bilinear_matrix(size_in: int, size_out: int) -> np.ndarray:
  """(size_out, size_in) weights of PyTorch's bilinear resize along one axis.

  `F.interpolate(mode="bilinear", align_corners=False)` without antialiasing: output pixel i
  samples the input at (i + 0.5) * size_in / size_out - 0.5, clamped below at 0, from its two
  neighbours (the upper one clamped at the last pixel). Downsampling therefore skips pixels
  rather than averaging them, as pytorch-fid does. The sample positions are rounded as PyTorch's
  kernels round them: a float32 scale, then scale * (i + 0.5) - 0.5 as one fused multiply-add
  rounded once to float32 (its CPU and CUDA builds contract it). Computing them more exactly
  moves the weights by up to ~3e-5, which the network amplifies far beyond float32 noise.
  """
  f32 = np.float32
  scale = f32(size_in) / f32(size_out)
  dst = np.arange(size_out, dtype=np.float64) + 0.5
  # float32 x float32 is exact in float64, so one cast to float32 rounds like an FMA.
  src = np.maximum((np.float64(scale) * dst - 0.5).astype(f32), f32(0))
  low = np.minimum(src.astype(np.int64), size_in - 1)  # src >= 0: truncation is floor
  high = np.minimum(low + 1, size_in - 1)
  frac = src - low.astype(f32)
  weights = np.zeros((size_out, size_in), f32)
  rows = np.arange(size_out)
  np.add.at(weights, (rows, low), f32(1) - frac)
  np.add.at(weights, (rows, high), frac)
  return weights


def resize_bilinear(images: jax.Array, size: Tuple[int, int],
                    precision: Precision = jax.lax.Precision.HIGHEST) -> jax.Array:
  """(B, H, W, C) float -> (B, size[0], size[1], C), PyTorch's bilinear (align_corners=False)."""
  h, w = images.shape[1:3]
  if (h, w) == tuple(size):
    return images  # the identity in PyTorch too: every sample lands on a pixel centre
  rows = jnp.asarray(bilinear_matrix(h, size[0]))
  cols = jnp.asarray(bilinear_matrix(w, size[1]))
  images = jnp.einsum("oh,bhwc->bowc", rows, images, precision=precision)
  return jnp.einsum("pw,bowc->bopc", cols, images, precision=precision)


def fid_input(images: jax.Array, precision: Precision = jax.lax.Precision.HIGHEST,
              dtype=jnp.float32) -> jax.Array:
  """uint8 (B, H, W, 3) -> float32 (B, 299, 299, 3) in [-1, 1], as pytorch-fid prepares images.

  pytorch-fid reads image files (uint8), scales to [0, 1], resizes, then maps to [-1, 1].
  Synthesised images are therefore quantised to uint8 before this, as if saved to PNG.
  """
  if images.dtype != jnp.uint8:
    raise TypeError(f"fid_input expects uint8 images (as pytorch-fid reads them from files), "
                    f"got {images.dtype}")
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"fid_input expects (B, H, W, 3) images, got shape {images.shape}")
  x = images.astype(dtype) / 255.0
  x = resize_bilinear(x, (INPUT_SIZE, INPUT_SIZE), precision)
  return 2.0 * x - 1.0


# -- layers ---------------------------------------------------------------------------------------
class FrozenBatchNorm(nn.Module):
  """Inference-mode BatchNorm: running statistics and affine parameters, all in `params`.

  The network is never trained here, so the four tensors of PyTorch's BatchNorm2d are plain
  parameters: `scale` (its `weight`), `bias`, `running_mean` and `running_var`.
  """
  eps: float = 1e-3

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
    mean = self.param("running_mean", nn.initializers.zeros, (c,), jnp.float32)
    var = self.param("running_var", nn.initializers.ones, (c,), jnp.float32)
    return (x - mean) * (scale * jax.lax.rsqrt(var + self.eps)) + bias


def _pairs(v: _Pad) -> Tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """torchvision's BasicConv2d: convolution without bias, BatchNorm (eps 1e-3), ReLU."""
  features: int
  kernel: _Pad
  stride: int = 1
  padding: _Pad = 0
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    ph, pw = _pairs(self.padding)
    x = nn.Conv(self.features, _pairs(self.kernel), strides=(self.stride, self.stride),
                padding=((ph, ph), (pw, pw)), use_bias=False, precision=self.precision,
                name="conv")(x)
    return nn.relu(FrozenBatchNorm(name="bn")(x))


def _avg_pool_same(x):
  """3x3 stride-1 average pool, padding left out of the mean (TensorFlow; FID patch)."""
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_valid(x):
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
  """An Inception block: `branches` of BasicConv2d layers (at the network's precision) side by
  side, their outputs concatenated along channels. A block with fields of its own declares them
  `kw_only=True`: they follow `precision`, which has a default."""
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    return jnp.concatenate(self.branches(x), axis=-1)

  def branches(self, x) -> list:
    raise NotImplementedError

  def conv(self, features: int, kernel: _Pad, **kwargs) -> BasicConv2d:
    return BasicConv2d(features, kernel, precision=self.precision, **kwargs)


class FIDInceptionA(_Block, kw_only=True):
  pool_features: int

  def branches(self, x):
    conv = self.conv
    b1 = conv(64, 1, name="branch1x1")(x)
    b5 = conv(48, 1, name="branch5x5_1")(x)
    b5 = conv(64, 5, padding=2, name="branch5x5_2")(b5)
    b3 = conv(64, 1, name="branch3x3dbl_1")(x)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_2")(b3)
    b3 = conv(96, 3, padding=1, name="branch3x3dbl_3")(b3)
    bp = conv(self.pool_features, 1, name="branch_pool")(_avg_pool_same(x))
    return [b1, b5, b3, bp]


class InceptionB(_Block):
  def branches(self, x):
    conv = self.conv
    b3 = conv(384, 3, stride=2, name="branch3x3")(x)
    bd = conv(64, 1, name="branch3x3dbl_1")(x)
    bd = conv(96, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = conv(96, 3, stride=2, name="branch3x3dbl_3")(bd)
    return [b3, bd, _max_pool_valid(x)]


class FIDInceptionC(_Block, kw_only=True):
  channels_7x7: int

  def branches(self, x):
    conv, c7 = self.conv, self.channels_7x7
    b1 = conv(192, 1, name="branch1x1")(x)
    b7 = conv(c7, 1, name="branch7x7_1")(x)
    b7 = conv(c7, (1, 7), padding=(0, 3), name="branch7x7_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7_3")(b7)
    bd = conv(c7, 1, name="branch7x7dbl_1")(x)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_2")(bd)
    bd = conv(c7, (1, 7), padding=(0, 3), name="branch7x7dbl_3")(bd)
    bd = conv(c7, (7, 1), padding=(3, 0), name="branch7x7dbl_4")(bd)
    bd = conv(192, (1, 7), padding=(0, 3), name="branch7x7dbl_5")(bd)
    bp = conv(192, 1, name="branch_pool")(_avg_pool_same(x))
    return [b1, b7, bd, bp]


class InceptionD(_Block):
  def branches(self, x):
    conv = self.conv
    b3 = conv(192, 1, name="branch3x3_1")(x)
    b3 = conv(320, 3, stride=2, name="branch3x3_2")(b3)
    b7 = conv(192, 1, name="branch7x7x3_1")(x)
    b7 = conv(192, (1, 7), padding=(0, 3), name="branch7x7x3_2")(b7)
    b7 = conv(192, (7, 1), padding=(3, 0), name="branch7x7x3_3")(b7)
    b7 = conv(192, 3, stride=2, name="branch7x7x3_4")(b7)
    return [b3, b7, _max_pool_valid(x)]


class FIDInceptionE(_Block, kw_only=True):
  """`max_pool=False`: FIDInceptionE_1 (Mixed_7b); True: FIDInceptionE_2 (Mixed_7c), whose pool
  branch max-pools (a quirk of the TensorFlow graph that FID is defined by)."""
  max_pool: bool

  def branches(self, x):
    conv = self.conv
    b1 = conv(320, 1, name="branch1x1")(x)
    b3 = conv(384, 1, name="branch3x3_1")(x)
    b3 = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3_2a")(b3),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3_2b")(b3)], axis=-1)
    bd = conv(448, 1, name="branch3x3dbl_1")(x)
    bd = conv(384, 3, padding=1, name="branch3x3dbl_2")(bd)
    bd = jnp.concatenate([conv(384, (1, 3), padding=(0, 1), name="branch3x3dbl_3a")(bd),
                          conv(384, (3, 1), padding=(1, 0), name="branch3x3dbl_3b")(bd)], axis=-1)
    if self.max_pool:
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_same(x)
    bp = conv(192, 1, name="branch_pool")(pooled)
    return [b1, b3, bd, bp]


# -- the network -----------------------------------------------------------------------------------
class InceptionV3(nn.Module):
  """pytorch-fid's InceptionV3 up to pool3: (B, H, W, 3) in [-1, 1] -> (B, 2048).

  Feed it `fid_input(uint8 images)` (299x299). Submodule names are the PyTorch ones.
  """
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    conv = functools.partial(BasicConv2d, precision=self.precision)
    p = self.precision
    x = conv(32, 3, stride=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_valid(x)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_valid(x)
    x = FIDInceptionA(pool_features=32, precision=p, name="Mixed_5b")(x)
    x = FIDInceptionA(pool_features=64, precision=p, name="Mixed_5c")(x)
    x = FIDInceptionA(pool_features=64, precision=p, name="Mixed_5d")(x)
    x = InceptionB(precision=p, name="Mixed_6a")(x)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
      x = FIDInceptionC(channels_7x7=c7, precision=p, name=name)(x)
    x = InceptionD(precision=p, name="Mixed_7a")(x)
    x = FIDInceptionE(max_pool=False, precision=p, name="Mixed_7b")(x)
    x = FIDInceptionE(max_pool=True, precision=p, name="Mixed_7c")(x)
    return jnp.mean(x, axis=(1, 2))  # adaptive average pool to 1x1: pool3


def abstract_params(module: InceptionV3 = InceptionV3()) -> Any:
  """Parameter shapes (ShapeDtypeStructs) of the network, without computing anything."""
  x = jax.ShapeDtypeStruct((1, INPUT_SIZE, INPUT_SIZE, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]


def features(params, images: jax.Array, module: InceptionV3 = InceptionV3()) -> jax.Array:
  """uint8 (B, H, W, 3) -> float32 pool3 features (B, 2048), exactly pytorch-fid's pipeline."""
  return module.apply({"params": params}, fid_input(images, module.precision))


class RunningStatistics:
  """(mu, sigma) of activations seen in batches, in float64, without keeping them all.

  Keeps the count, the sum and the sum of outer products, so partial statistics (e.g. one per
  process) add up: sum `count`, `sum` and `outer` (evaluators/fid.py). Equals pytorch-fid's
  mean and np.cov of all the batches concatenated, to float64 rounding (pool3 features are O(1)
  with O(1) spread, so E[xx^T] - mu mu^T loses nothing that float32 features had).
  """

  def __init__(self, dim: int = FEATURES):
    self.dim = dim
    self.count = 0
    self.sum = np.zeros(dim, np.float64)
    self.outer = np.zeros((dim, dim), np.float64)

  def update(self, activations: Sequence) -> None:
    a = np.asarray(activations, np.float64).reshape(-1, self.dim)
    self.count += len(a)
    self.sum += a.sum(axis=0)
    self.outer += a.T @ a

  def result(self) -> Tuple[np.ndarray, np.ndarray]:
    if self.count < 2:
      raise ValueError(f"FID statistics need at least 2 images, got {self.count}")
    mean = self.sum / self.count
    sigma = (self.outer - self.count * np.outer(mean, mean)) / (self.count - 1)
    return mean, sigma
