"""SemFlow as a whole: encode image / anchor image, velocity, loss, segment, synthesise.

Built once from config and shared by training, evaluation and sampling. Every method is a pure
function of (params, inputs, rng); callers jit them. Time convention: t = 0 image, t = 1 mask.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections

from semflow_jax import anchors, flow
from semflow_jax.models import IdentityAutoencoder, UNet


@dataclasses.dataclass(frozen=True)
class SemFlow:
  unet: UNet
  autoencoder: IdentityAutoencoder
  num_classes: int
  image_size: tuple          # (H, W) the model works at
  perturbation: float = anchors.DEFAULT_PERTURBATION
  # Training times: 'uniform' is U[0, 1) as in the paper; 'beta' draws Beta(a, a), which for
  # a < 1 puts more samples near t = 0 (where one-step segmentation reads the image) and t = 1
  # (where synthesis commits to an appearance) than in the middle of the path.
  time_sampling: str = "uniform"
  time_beta: float = 0.5
  # Preconditioned velocity v = UNet(z_t, t) + (2t - 1) z_t. One-step segmentation returns
  # z0 + v(z0, 0), so a plain UNet must reproduce -z0 pixel for pixel (noise and texture
  # included) to cancel it; with the skip the UNet outputs the clean anchor at t = 0 and the
  # clean image at t = 1, and nothing has to be copied. False is the paper's plain UNet.
  input_skip: bool = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> "SemFlow":
    m = config.model
    if m.autoencoder != "identity":
      raise ValueError(f"config.model.autoencoder={m.autoencoder!r} is not supported yet; "
                       "use 'identity'")
    autoencoder = IdentityAutoencoder()
    size = tuple(config.data.image_size) if isinstance(config.data.image_size, (tuple, list)) \
        else (config.data.image_size, config.data.image_size)
    unet = UNet(out_channels=3, base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
                num_res_blocks=m.num_res_blocks, attention_resolutions=tuple(m.attention_resolutions),
                num_heads=m.num_heads, groups=m.groups, dropout=m.dropout, patch_size=m.patch_size)
    if not 0 <= m.perturbation < 2 * anchors.HALF_SPACING:
      raise ValueError(f"config.model.perturbation={m.perturbation} must be in [0, "
                       f"{2 * anchors.HALF_SPACING:.3f}) so that labels never change")
    if m.time_sampling not in ("uniform", "beta"):
      raise ValueError(f"config.model.time_sampling={m.time_sampling!r}: expected 'uniform' "
                       "or 'beta'")
    return cls(unet=unet, autoencoder=autoencoder, num_classes=config.data.num_classes,
               image_size=size, perturbation=m.perturbation, time_sampling=m.time_sampling,
               time_beta=m.time_beta, input_skip=m.input_skip)

  @property
  def latent_shape(self):
    return self.autoencoder.latent_shape((*self.image_size, 3))

  def init(self, rng):
    """UNet parameters (the trainable part). The identity autoencoder has none."""
    z = jnp.zeros((1, *self.latent_shape), jnp.float32)
    return self.unet.init(rng, z, jnp.zeros((1,), jnp.float32))["params"]

  # -- latents ---------------------------------------------------------------------------------
  def encode_image(self, images, rng=None):
    """uint8 (B, H, W, 3) -> z0. Posterior sample when `rng` is given (training), else mean."""
    x = anchors.to_unit_range(images)
    mean, logvar = self.autoencoder.apply({}, x, method="encode")
    if rng is not None:
      mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    return mean * self.autoencoder.scaling_factor

  def encode_labels(self, labels, rng):
    """uint8 (B, H, W[, 1]) labels -> z1, the latent of the perturbed anchor image (Eq. 14)."""
    anchor_image = anchors.perturb(anchors.render(labels), rng, self.perturbation)
    mean, _ = self.autoencoder.apply({}, anchor_image, method="encode")
    return mean * self.autoencoder.scaling_factor

  def decode(self, z):
    return self.autoencoder.apply({}, z / self.autoencoder.scaling_factor, method="decode")

  # -- the velocity field ----------------------------------------------------------------------
  def velocity(self, params, z, t, rng=None):
    """dz/dt at time t (scalar or (B,) in [0, 1]); the UNet sees timestep 1000 t."""
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
    deterministic = rng is None
    rngs = None if deterministic else {"dropout": rng}
    v = self.unet.apply({"params": params}, z, 1000.0 * t, deterministic=deterministic,
                        rngs=rngs)
    if self.input_skip:
      v = v + flow.expand_time(2.0 * t - 1.0, z) * z
    return v

  def loss(self, params, batch, rng):
    """Rectified-flow loss on a batch {'image': uint8, 'label': uint8[, 'mask']}."""
    rng_z0, rng_z1, rng_t, rng_dropout = jax.random.split(rng, 4)
    z0 = self.encode_image(batch["image"], rng_z0)
    z1 = self.encode_labels(batch["label"], rng_z1)
    t = self.sample_times(rng_t, z0.shape[0])
    v = self.velocity(params, flow.interpolate(z0, z1, t), t, rng_dropout)
    per_example = jnp.mean(jnp.square(v - flow.velocity_target(z0, z1)),
                           axis=tuple(range(1, v.ndim)))
    weights = batch.get("mask", jnp.ones_like(per_example))
    return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)

  def sample_times(self, rng, n: int):
    if self.time_sampling == "beta":
      return jax.random.beta(rng, self.time_beta, self.time_beta, (n,))
    return jax.random.uniform(rng, (n,))

  # -- both directions -------------------------------------------------------------------------
  def segment(self, params, images, steps: int = 25, method: str = "euler"):
    """uint8 images -> int32 labels: integrate t 0 -> 1, decode, nearest anchor. Deterministic."""
    z1 = flow.integrate(functools.partial(self.velocity, params), self.encode_image(images),
                        0.0, 1.0, steps, method)
    return anchors.decode(self.decode(z1), self.num_classes)

  def synthesize(self, params, labels, rng, steps: int = 25, method: str = "euler"):
    """Labels -> images in [-1, 1]: perturb the anchor latent, integrate t 1 -> 0, decode."""
    z0 = flow.integrate(functools.partial(self.velocity, params), self.encode_labels(labels, rng),
                        1.0, 0.0, steps, method)
    return jnp.clip(self.decode(z0), -1.0, 1.0)
