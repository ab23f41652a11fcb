"""LPIPS (Zhang et al. 2018), AlexNet trunk with the v0.1 linear heads, as a Linen module.

distance(x0, x1) = sum over the five ReLU outputs l of AlexNet's `features` of
    mean_{h,w} sum_c w_{l,c} (f0_{l,hwc} - f1_{l,hwc})^2,
where f is the feature map unit-normalised over channels (norm + 1e-10, as the lpips package),
the inputs are images in [-1, 1] passed through lpips' scaling layer
((x - shift) / scale with shift = (-.030, -.088, -.188), scale = (.458, .448, .450)), and w_l are
the non-negative v0.1 linear heads (`lin0` ... `lin4`, 1x1 convolutions without bias).

Weights: the trunk is torchvision's ImageNet AlexNet,
  https://download.pytorch.org/models/alexnet-owt-7be5be79.pth
(keys `features.0.weight` ...; the `classifier.*` keys are not used), and the heads are the
lpips package's `lpips/weights/v0.1/alex.pth` (`pip download --no-deps lpips==0.1.4`, or the
file in the package's repository; keys `lin0.model.1.weight` ...). Convert both with
`python -m semflow_jax.convert_eval_nets --lpips_alex=... --lpips_heads=... --output=DIR`;
evaluation reads them from `config.eval.lpips_weights=DIR` (see semflow_jax/convert_eval_nets.py).
Parameter names follow the PyTorch keys: `alexnet/features_<i>/{kernel,bias}` (torchvision's
`features.<i>.{weight,bias}`) and `lin<l>/model_1/kernel` (lpips' `lin<l>.model.1.weight`).

Math only: no I/O. Convolutions default to float32 precision (`lax.Precision.HIGHEST`).
"""

from typing import Any, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Precision = Union[None, str, jax.lax.Precision]

# lpips.ScalingLayer: ImageNet statistics expressed for inputs in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
CHANNELS = (64, 192, 384, 256, 256)  # the five tapped ReLU outputs (relu1 ... relu5)
NORM_EPS = 1e-10


class AlexNetFeatures(nn.Module):
  """torchvision's `alexnet().features` up to the last ReLU; returns the five ReLU outputs.

  Indices (and parameter names) follow torchvision: conv 0, 3, 6, 8, 10; max pools 2 and 5.
  """
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x) -> Tuple[jax.Array, ...]:
    def conv(h, index, features, kernel, stride, padding):
      return nn.relu(nn.Conv(features, (kernel, kernel), strides=(stride, stride),
                             padding=((padding, padding), (padding, padding)),
                             precision=self.precision, name=f"features_{index}")(h))

    def pool(h):
      return nn.max_pool(h, (3, 3), strides=(2, 2), padding="VALID")

    relu1 = conv(x, 0, 64, 11, 4, 2)
    relu2 = conv(pool(relu1), 3, 192, 5, 1, 2)
    relu3 = conv(pool(relu2), 6, 384, 3, 1, 1)
    relu4 = conv(relu3, 8, 256, 3, 1, 1)
    relu5 = conv(relu4, 10, 256, 3, 1, 1)
    return relu1, relu2, relu3, relu4, relu5


class NetLinLayer(nn.Module):
  """One v0.1 head: a 1x1 convolution to one channel, no bias. Named `model_1` because lpips
  wraps it as `nn.Sequential(Dropout, Conv2d)`, so its weight is `lin<l>.model.1.weight`."""
  precision: Precision = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    return nn.Conv(1, (1, 1), use_bias=False, precision=self.precision, name="model_1")(x)[..., 0]


def _unit_normalise(f):
  return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + NORM_EPS)


class LPIPS(nn.Module):
  """LPIPS v0.1 (AlexNet). `__call__(x0, x1)`: images (B, H, W, 3) in [-1, 1] -> (B,) distances.

  `features(x)` returns the unit-normalised feature maps of one batch and `distance(f0, f1)`
  compares two such sets, so N images compared pairwise go through AlexNet N times, not N^2.
  Images must be at least 32 pixels on each side (AlexNet's last map is then 1x1).
  """
  precision: Precision = jax.lax.Precision.HIGHEST

  def setup(self):
    self.alexnet = AlexNetFeatures(self.precision)
    self.heads = [NetLinLayer(self.precision, name=f"lin{i}") for i in range(len(CHANNELS))]

  def features(self, x) -> Tuple[jax.Array, ...]:
    x = (x.astype(jnp.float32) - jnp.asarray(SHIFT)) / jnp.asarray(SCALE)
    return tuple(_unit_normalise(f) for f in self.alexnet(x))

  def distance(self, features0, features1) -> jax.Array:
    total = 0.0
    for head, f0, f1 in zip(self.heads, features0, features1):
      total = total + jnp.mean(head((f0 - f1) ** 2), axis=(-2, -1))
    return total

  def __call__(self, x0, x1) -> jax.Array:
    return self.distance(self.features(x0), self.features(x1))


def abstract_params(module: LPIPS = LPIPS()) -> Any:
  """Parameter shapes (ShapeDtypeStructs) of the network, without computing anything."""
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x, x)["params"]
