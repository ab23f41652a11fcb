"""SemFlow as a whole: encode image / anchor image, velocity, loss, segment, synthesise.

Built once from config and shared by training, evaluation and sampling. Every method is a pure
function of (params, inputs, rng); callers jit them. Time convention: t = 0 image, t = 1 mask.
"""

import dataclasses
import functools
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from semflow_jax import anchors, flow
from semflow_jax.models import IdentityAutoencoder, UNet
from jax.sharding import Mesh

from semflow_jax.models.sd_layers import AttentionImpl, shard_batch
from semflow_jax.models.sd_unet import SDUNet, SDUNetConfig
from semflow_jax.models.sd_vae import AutoencoderKL, SDVAEConfig


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
FROZEN = ("vae", "context")  # parameter groups that are loaded, never trained
# config.model.remat_policy, with model.remat: recompute every UNet block whole in the backward
# pass ('full'), or all but the outputs of its projection matmuls ('dots'; SD UNet only).
REMAT_POLICIES = ("full", "dots")


@dataclasses.dataclass(frozen=True)
class SemFlow:
  """The parameters are a dict: 'unet' (trained), plus 'vae' (the SD autoencoder) and 'context'
  (the empty-prompt text embedding for the SD UNet's cross-attention) when the model has them;
  those two are frozen, loaded from `config.model.init_from`."""
  unet: nn.Module                 # UNet (small, pixel space) or SDUNet
  autoencoder: nn.Module          # IdentityAutoencoder or AutoencoderKL
  num_classes: int
  image_size: tuple               # (H, W) the model works at
  # The anchor colours (config.model.palette), for every caller that turns labels into anchor
  # images or anchor images into labels: training, evaluation, sampling, editing.
  palette: anchors.Palette
  # Eq. 14 amplitude as a fraction of half the anchor spacing (so one value means the same on
  # every palette); below 1 a perturbed anchor always decodes to its own class.
  perturbation: float = anchors.PAPER_PERTURBATION
  # The perturbation's components (anchors.perturb): (0,) is Eq. 14's per-pixel noise; adding
  # coarse grids (1: a shift per image, 4: a smooth field) moves whole objects' colours.
  perturbation_grids: tuple = (0,)
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
  context_tokens: int = 77        # SD UNet: length of the text embedding it attends to
  # The devices the model's programs run on (from_config's `mesh`): latents and the UNet's
  # activations between blocks are constrained to the batch split over all of them.
  mesh: Optional[Mesh] = None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, mesh=None) -> "SemFlow":
    """The model of `config`. `mesh`: the devices its programs run on (default: this process's
    backend, unsharded); the SD attention kernels are chosen for their platform and run per
    device over it (config.model.attention)."""
    m = config.model
    dtype_name = m.get("dtype", "float32")
    if dtype_name not in DTYPES:
      raise ValueError(f"config.model.dtype={dtype_name!r}: expected one of {sorted(DTYPES)}")
    remat, policy = bool(m.get("remat", False)), m.get("remat_policy", "full")
    if policy not in REMAT_POLICIES:
      raise ValueError(f"config.model.remat_policy={policy!r}: expected one of {REMAT_POLICIES}")
    dtype = DTYPES[dtype_name]
    platform = mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()
    attention = AttentionImpl(m.get("attention", "auto"), platform, mesh)
    if m.autoencoder == "identity":
      autoencoder = IdentityAutoencoder()
    elif m.autoencoder == "sd_vae":
      autoencoder = AutoencoderKL(
          SDVAEConfig.from_diffusers(_plain(m.get("vae_config")), "config.model.vae_config"),
          dtype=dtype, attention=attention)
    else:
      raise ValueError(f"config.model.autoencoder={m.autoencoder!r}: expected 'identity' or "
                       "'sd_vae'")
    size = tuple(config.data.image_size) if isinstance(config.data.image_size, (tuple, list)) \
        else (config.data.image_size, config.data.image_size)
    unet_kind = m.get("unet", "small")
    if unet_kind == "small":
      unet = UNet(out_channels=3, base_channels=m.base_channels,
                  channel_mult=tuple(m.channel_mult), num_res_blocks=m.num_res_blocks,
                  attention_resolutions=tuple(m.attention_resolutions), num_heads=m.num_heads,
                  groups=m.groups, dropout=m.dropout, patch_size=m.patch_size, dtype=dtype,
                  remat=remat)
    elif unet_kind == "sd":
      unet = SDUNet(SDUNetConfig.from_diffusers(_plain(m.get("unet_config")),
                                                "config.model.unet_config"),
                    dtype=dtype, remat="dots" if remat and policy == "dots" else remat,
                    attention=attention)
    else:
      raise ValueError(f"config.model.unet={unet_kind!r}: expected 'small' or 'sd'")
    anchors.check_perturbation(m.perturbation, "config.model.perturbation")
    grids = tuple(m.get("perturbation_grids", (0,)))
    anchors.check_grids(grids, "config.model.perturbation_grids")
    palette_name = m.get("palette", "paper")
    if palette_name not in anchors.PALETTES:
      raise ValueError(f"config.model.palette={palette_name!r}: expected one of "
                       f"{anchors.PALETTES}")
    try:
      palette = anchors.make_palette(palette_name, config.data.num_classes)
    except ValueError as e:
      raise ValueError(f"config.model.palette={palette_name!r} with config.data.num_classes="
                       f"{config.data.num_classes}: {e}") from None
    if m.time_sampling not in ("uniform", "beta"):
      raise ValueError(f"config.model.time_sampling={m.time_sampling!r}: expected 'uniform' "
                       "or 'beta'")
    model = cls(unet=unet, autoencoder=autoencoder, num_classes=config.data.num_classes,
                image_size=size, palette=palette, perturbation=m.perturbation,
                perturbation_grids=grids, time_sampling=m.time_sampling,
                time_beta=m.time_beta, input_skip=m.input_skip,
                context_tokens=m.get("context_tokens", 77), mesh=mesh)
    latent_channels = model.latent_shape[-1]
    if isinstance(unet, SDUNet) and (unet.config.in_channels, unet.config.out_channels) != (
        latent_channels, latent_channels):
      raise ValueError(f"config.model.unet_config: in_channels/out_channels "
                       f"{unet.config.in_channels}/{unet.config.out_channels} must equal the "
                       f"autoencoder's {latent_channels} latent channels")
    return model

  @property
  def latent_shape(self):
    return self.autoencoder.latent_shape((*self.image_size, 3))

  @property
  def uses_context(self) -> bool:
    return isinstance(self.unet, SDUNet)

  @property
  def has_vae(self) -> bool:
    return not isinstance(self.autoencoder, IdentityAutoencoder)

  def init(self, rng):
    """Random parameters {'unet'[, 'vae', 'context']}; the frozen parts come from init_from."""
    unet_rng, vae_rng = jax.random.split(rng)
    z = jnp.zeros((1, *self.latent_shape), jnp.float32)
    t = jnp.zeros((1,), jnp.float32)
    params = {}
    if self.uses_context:
      params["context"] = jnp.zeros(
          (1, self.context_tokens, self.unet.config.cross_attention_dim), jnp.float32)
      params["unet"] = self.unet.init(unet_rng, z, t, params["context"])["params"]
    else:
      params["unet"] = self.unet.init(unet_rng, z, t)["params"]
    if self.has_vae:
      params["vae"] = self._init_vae(vae_rng)
    return params

  def _init_vae(self, rng):
    image = jnp.zeros((1, *self.image_size, 3), jnp.float32)
    return self.autoencoder.init(rng, image)["params"]

  def init_vae(self, rng):
    """`init(rng)['vae']` without initialising the UNet (data/encode.py: a run from scratch)."""
    return self._init_vae(jax.random.split(rng)[1])

  # -- latents ---------------------------------------------------------------------------------
  def _vae(self, params, x, method):
    # The autoencoder is frozen: no gradients flow into it (and XLA drops that backward pass).
    variables = {"params": jax.lax.stop_gradient(params["vae"])} if self.has_vae else {}
    return self.autoencoder.apply(variables, x, method=method)

  def _scale(self, mean):
    shift = self.autoencoder.shift_factor if self.has_vae else 0.0
    return (mean - shift) * self.autoencoder.scaling_factor

  def encode_image(self, params, images, rng=None):
    """uint8 (B, H, W, 3) -> z0. Posterior sample when `rng` is given (training), else mean."""
    mean, logvar = self._vae(params, anchors.to_unit_range(images), "encode")
    return self._posterior_latent(mean, logvar, rng)

  def _encode_pairs(self, params, images, labels, rng_z0, rng_z1):
    """(z0, z1) as `encode_image(images, rng_z0)`, `encode_labels(labels, rng_z1)` compute
    them, through one call of the encoder on both: one copy of the VAE in the compiled step
    instead of two (at 512^2 its fusions are the most expensive ones to compile). Example j's
    image and anchor image are rows 2j and 2j + 1, so every device keeps its own rows."""
    pixels = jnp.stack([anchors.to_unit_range(images),
                        self.perturbed_anchors(labels, rng_z1).astype(jnp.float32)], axis=1)
    mean, logvar = self._vae(params, pixels.reshape(-1, *pixels.shape[2:]), "encode")
    mean, logvar = _pairs(mean), _pairs(logvar)
    return (self._posterior_latent(mean[:, 0], logvar[:, 0], rng_z0),
            self._scale(mean[:, 1]))

  def image_moments(self, params, images):
    """uint8 (B, H, W, 3) -> the VAE posterior's moments, mean and log-variance concatenated on
    channels: (B, h, w, 2 C) float32 at latent resolution. A training batch may carry these
    (key 'image_moments', config.data.image_latents) instead of the images: see `loss`."""
    mean, logvar = self._vae(params, anchors.to_unit_range(images), "encode")
    return jnp.concatenate([mean, logvar], axis=-1)

  def latent_from_moments(self, moments, rng=None):
    """`image_moments` -> z0, as `encode_image` gives it from the images (a posterior sample
    when `rng` is given, drawn with the same noise, else the mean)."""
    mean, logvar = jnp.split(jnp.asarray(moments, jnp.float32), 2, axis=-1)
    return self._posterior_latent(mean, logvar, rng)

  def _posterior_latent(self, mean, logvar, rng):
    # diffusers' DiagonalGaussianDistribution.sample(): mean + exp(logvar / 2) * N(0, 1).
    if rng is not None and self.has_vae:  # the identity's posterior has zero variance
      mean = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape)
    return self._scale(mean)

  # -- anchors (the palette) ------------------------------------------------------------------
  def render_anchors(self, labels):
    """Integer labels (..., H, W[, 1]) -> the anchor image (..., H, W, 3) in [-1, 1]."""
    return anchors.render(labels, self.palette)

  def decode_anchors(self, anchor_image):
    """Anchor image (..., H, W, 3) in [-1, 1] -> int32 labels, nearest of the K anchors."""
    return anchors.decode(anchor_image, self.palette)

  def perturbation_noise(self, rng, labels):
    """The noise in [-1, 1], (B, H, W, 3), that `encode_labels(params, labels, rng)` draws
    (`rng`: one key, or one key per example; see anchors.perturbation_noise)."""
    return anchors.perturbation_noise(rng, (*jnp.shape(labels)[:3], 3), self.perturbation_grids)

  def perturbed_anchors(self, labels, rng=None, noise=None):
    """Eq. 14: the anchor image plus `perturbation` x half the spacing times the noise
    (`perturbation_noise(rng, labels)`, or `noise` when given); with neither, unperturbed."""
    anchor_image = self.render_anchors(labels)
    if noise is None and rng is not None:
      noise = self.perturbation_noise(rng, labels)
    if noise is None:
      return anchor_image
    return anchors.perturb(anchor_image, None, self.palette, self.perturbation, noise=noise)

  def checkpoint_record(self) -> dict:
    """What a checkpoint records beside the parameters: the palette its anchors follow."""
    return {"palette": self.palette.name, "anchors": [list(c) for c in self.palette.colours],
            "ignore": list(self.palette.ignore)}

  def encode_labels(self, params, labels, rng=None, noise=None):
    """uint8 (B, H, W[, 1]) labels -> z1, the latent of the perturbed anchor image (Eq. 14).

    The noise is `perturbation_noise(rng, labels)`, or `noise` when given (to edit it: regional
    re-sampling); with neither, the anchor image is not perturbed.
    """
    mean, _ = self._vae(params, self.perturbed_anchors(labels, rng, noise), "encode")
    return self._scale(mean)

  def decode(self, params, z):
    shift = self.autoencoder.shift_factor if self.has_vae else 0.0
    return self._vae(params, z / self.autoencoder.scaling_factor + shift, "decode")

  # -- the velocity field ----------------------------------------------------------------------
  def velocity(self, params, z, t, rng=None):
    """dz/dt at time t (scalar or (B,) in [0, 1]); the UNet sees timestep 1000 t.

    An ensemble's params hold a tuple of UNet parameter trees under 'unet' (controls.ensemble);
    its velocity is the members' mean, so every method integrates the averaged field.
    """
    if isinstance(params["unet"], (tuple, list)):
      members = [self.velocity({**params, "unet": unet}, z, t, rng) for unet in params["unet"]]
      return sum(members[1:], members[0]) / len(members)
    t = jnp.broadcast_to(jnp.asarray(t, jnp.float32), z.shape[:1])
    if self.uses_context:
      context = shard_batch(jnp.broadcast_to(jax.lax.stop_gradient(params["context"]),
                                             (z.shape[0], *params["context"].shape[1:])),
                            self.mesh)
      v = self.unet.apply({"params": params["unet"]}, z, 1000.0 * t, context)
    else:
      deterministic = rng is None
      rngs = None if deterministic else {"dropout": rng}
      v = self.unet.apply({"params": params["unet"]}, z, 1000.0 * t,
                          deterministic=deterministic, rngs=rngs)
    if self.input_skip:
      v = v + flow.expand_time(2.0 * t - 1.0, z) * z
    return v

  def loss(self, params, batch, rng):
    """Rectified-flow loss on a batch {'image' | 'image_moments', 'label'[, 'mask']}.

    'image': uint8 (B, H, W, 3), encoded here; 'image_moments': the VAE posterior's moments of
    the images, precomputed (`image_moments`), from which z0 is sampled with the noise that
    encoding the images would draw. 'label': uint8 (B, H, W[, 1]), whose perturbed anchor image
    is always encoded here (Eq. 14 draws its noise in pixel space every step). 'mask': optional
    per-example weights.
    """
    rng_z0, rng_z1, rng_t, rng_dropout = jax.random.split(rng, 4)
    labels = shard_batch(batch["label"], self.mesh)
    if "image_moments" in batch:
      z0 = self.latent_from_moments(shard_batch(batch["image_moments"], self.mesh), rng_z0)
      z1 = self.encode_labels(params, labels, rng_z1)
    else:
      z0, z1 = self._encode_pairs(params, shard_batch(batch["image"], self.mesh), labels,
                                  rng_z0, rng_z1)
    z0, z1 = shard_batch(z0, self.mesh), shard_batch(z1, self.mesh)
    t = self.sample_times(rng_t, z0.shape[0])
    v = self.velocity(params, flow.interpolate(z0, z1, t), t, rng_dropout)
    return flow.flow_matching_loss(v, z0, z1, batch.get("mask"))

  def sample_times(self, rng, n: int):
    if self.time_sampling == "beta":
      return jax.random.beta(rng, self.time_beta, self.time_beta, (n,))
    return jax.random.uniform(rng, (n,))

  # -- both directions -------------------------------------------------------------------------
  def segment(self, params, images, steps: int = 25, method: str = "euler"):
    """uint8 images -> int32 labels: integrate t 0 -> 1, decode, nearest anchor. Deterministic."""
    z1 = flow.integrate(functools.partial(self.velocity, params),
                        self.encode_image(params, images), 0.0, 1.0, steps, method)
    return self.decode_anchors(self.decode(params, z1))

  def synthesize(self, params, labels, rng, steps: int = 25, method: str = "euler"):
    """Labels -> images in [-1, 1]: perturb the anchor latent, integrate t 1 -> 0, decode.

    `rng`: one key for the batch, or one key per example (noise keyed by example)."""
    z0 = flow.integrate(functools.partial(self.velocity, params),
                        self.encode_labels(params, labels, rng), 1.0, 0.0, steps, method)
    return jnp.clip(self.decode(params, z0), -1.0, 1.0)


def _pairs(x):
  """(2B, ...) rows 2j, 2j + 1 -> (B, 2, ...)."""
  return x.reshape(-1, 2, *x.shape[1:])


def _plain(value):
  """ConfigDict / None -> dict for the diffusers-style model configs."""
  if value is None:
    raise ValueError("config.model.unet_config / vae_config must be set for unet='sd' / "
                     "autoencoder='sd_vae' (see configs/sd15.py)")
  return value.to_dict() if hasattr(value, "to_dict") else dict(value)
