"""The Stable Diffusion 1.x/2.x UNet (diffusers' `UNet2DConditionModel`) as a Linen module.

`SDUNetConfig.from_diffusers(config_json_dict)` reads a diffusers `unet/config.json`; options
this module does not implement are refused by name rather than silently ignored. The module
maps (x NHWC, timesteps (B,), context (B, S, D)) -> NHWC, and its parameter tree mirrors the
PyTorch state dict (see `semflow_jax.convert`). The same code serves tiny test sizes and SD-1.5.
"""

import dataclasses
from typing import Any, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from absl import logging

from semflow_jax.models import sd_layers as L

CROSS_DOWN, PLAIN_DOWN = "CrossAttnDownBlock2D", "DownBlock2D"
CROSS_UP, PLAIN_UP = "CrossAttnUpBlock2D", "UpBlock2D"

# diffusers options whose only supported value is the default (the SD-1.x/2.x family).
_FIXED = {
    "act_fn": "silu", "center_input_sample": False, "class_embed_type": None,
    "addition_embed_type": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "num_class_embeds": None, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "only_cross_attention": False,
    "mid_block_only_cross_attention": None, "dual_cross_attention": False,
    "attention_type": "default", "class_embeddings_concat": False, "cross_attention_norm": None,
    "num_attention_heads": None, "dropout": 0.0, "projection_class_embeddings_input_dim": None,
    "addition_time_embed_dim": None, "reverse_transformer_layers_per_block": None,
}
# Keys that do not change the computation (or that this port always honours, like upcasting
# the attention softmax to float32).
_IGNORED = {"sample_size", "upcast_attention", "addition_embed_type_num_heads"}


def _per_block(value, n: int, key: str) -> Tuple[Any, ...]:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"unet config {key}={value} has {len(value)} entries for {n} blocks")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class SDUNetConfig:
  """The architecture-defining keys of a diffusers UNet2DConditionModel config."""
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
  down_block_types: Tuple[str, ...] = (CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, PLAIN_DOWN)
  up_block_types: Tuple[str, ...] = (PLAIN_UP, CROSS_UP, CROSS_UP, CROSS_UP)
  layers_per_block: Union[int, Tuple[int, ...]] = 2
  transformer_layers_per_block: Union[int, Tuple[int, ...]] = 1
  # diffusers' historical name: for SD-1.x/2.x this is the number of heads per block.
  attention_head_dim: Union[int, Tuple[int, ...]] = 8
  cross_attention_dim: int = 768
  use_linear_projection: bool = False
  flip_sin_to_cos: bool = True
  freq_shift: int = 0
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  downsample_padding: int = 1
  mid_block_scale_factor: float = 1.0

  @classmethod
  def from_diffusers(cls, config: dict, source: str = "unet config") -> "SDUNetConfig":
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, default in _FIXED.items():
      if key in config and config[key] != default and not (
          key == "only_cross_attention" and not any(_per_block(config[key], 1, key))):
        raise ValueError(f"{source}: {key}={config[key]!r} is not supported (only {default!r}); "
                         "semflow_jax implements the SD-1.x/2.x UNet family")
    unknown = [k for k in config if not k.startswith("_") and k not in fields
               and k not in _FIXED and k not in _IGNORED]
    if unknown:
      logging.warning("%s: ignoring keys %s", source, unknown)
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items() if k in fields}
    if isinstance(kwargs.get("cross_attention_dim"), tuple):
      raise ValueError(f"{source}: per-block cross_attention_dim is not supported")
    result = cls(**kwargs)
    result.validate(source)
    return result

  def validate(self, source: str = "unet config"):
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"{source}: down_block_types, up_block_types and block_out_channels "
                       "must have the same length")
    for key, allowed in (("down_block_types", (CROSS_DOWN, PLAIN_DOWN)),
                         ("up_block_types", (CROSS_UP, PLAIN_UP))):
      bad = [b for b in getattr(self, key) if b not in allowed]
      if bad:
        raise ValueError(f"{source}: {key} {bad} not supported (only {allowed})")
    for key in ("layers_per_block", "transformer_layers_per_block", "attention_head_dim"):
      _per_block(getattr(self, key), n, key)
    for c, heads in zip(self.block_out_channels, self.heads_per_block()):
      if c % heads:
        raise ValueError(f"{source}: {c} channels do not split into {heads} attention heads")

  def heads_per_block(self):
    return _per_block(self.attention_head_dim, len(self.block_out_channels), "attention_head_dim")

  def to_diffusers(self) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


class _Blocks(nn.Module):
  """One diffusers block (`down_blocks.i`, `mid_block`, `up_blocks.i`): ResNets, optional
  transformers, optional resampler, named as in diffusers."""
  kind: str                 # 'down', 'mid' or 'up'
  channels: int
  num_layers: int
  cross_attention: bool
  resample: bool
  heads: int
  depth: int
  cfg: SDUNetConfig
  dtype: Any
  remat: Union[bool, str]
  attention: L.AttentionImpl = L.AttentionImpl()

  @nn.compact
  def __call__(self, h, temb, context, skips=None):
    cfg, dt = self.cfg, self.dtype
    # remat 'dots' keeps the outputs of the attention and feed-forward projections (matmuls
    # without batch dimensions) and recomputes convolutions, norms and attention weights.
    policy = (jax.checkpoint_policies.dots_with_no_batch_dims_saveable if self.remat == "dots"
              else None)
    remat = lambda cls: nn.remat(cls, policy=policy) if self.remat else cls
    resnet_cls, transformer_cls = remat(L.ResnetBlock2D), remat(L.Transformer2D)
    scale = cfg.mid_block_scale_factor if self.kind == "mid" else 1.0

    shard = lambda h: L.shard_batch(h, self.attention.mesh)

    def resnet(j, h):
      return shard(resnet_cls(self.channels, cfg.norm_num_groups, cfg.norm_eps, scale, dt,
                              name=f"resnets_{j}")(h, temb))

    def transformer(j, h):
      return shard(transformer_cls(self.heads, self.channels // self.heads, self.depth,
                                   cfg.norm_num_groups, cfg.use_linear_projection, dt,
                                   attention=self.attention, name=f"attentions_{j}")(h, context))

    if self.kind == "mid":
      h = resnet(0, h)
      return resnet(1, transformer(0, h))

    outputs = []
    for j in range(self.num_layers):
      if self.kind == "up":
        h = jnp.concatenate([h, skips.pop()], axis=-1)
      h = resnet(j, h)
      if self.cross_attention:
        h = transformer(j, h)
      outputs.append(h)
    if self.resample and self.kind == "down":
      h = shard(L.Downsample2D(self.channels, cfg.downsample_padding, dt,
                               name="downsamplers_0")(h))
      outputs.append(h)
    if self.resample and self.kind == "up":
      h = shard(L.Upsample2D(self.channels, dt, name="upsamplers_0")(h))
    return h, outputs


class SDUNet(nn.Module):
  """Velocity/noise UNet: (x (B, H, W, C_in), timesteps (B,), context (B, S, D)) -> (B, H, W, C_out).

  `dtype` is the compute dtype (parameters stay float32); `remat` (True, or 'dots' to keep the
  projection matmuls' outputs) recomputes every ResNet and transformer block in the backward
  pass instead of storing its activations; `attention` picks
  the attention kernel per layer (sd_layers.AttentionImpl).
  """
  config: SDUNetConfig
  dtype: Any = jnp.float32
  remat: Union[bool, str] = False
  attention: L.AttentionImpl = L.AttentionImpl()

  @nn.compact
  def __call__(self, x, timesteps, context):
    cfg, dt = self.config, self.dtype
    n = len(cfg.block_out_channels)
    layers = _per_block(cfg.layers_per_block, n, "layers_per_block")
    depth = _per_block(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
    heads = cfg.heads_per_block()
    x, context = x.astype(dt), context.astype(dt)
    timesteps = jnp.broadcast_to(timesteps, x.shape[:1])

    temb = L.timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos,
                                cfg.freq_shift)
    temb = L.TimestepEmbedding(4 * cfg.block_out_channels[0], dt, name="time_embedding")(
        temb.astype(dt))

    def blocks(kind, i, block, channels, cross, resample, num_layers, name):
      return _Blocks(kind, channels, num_layers, cross, resample, heads[block], depth[block], cfg,
                     dt, self.remat, attention=self.attention, name=name)

    shard = lambda h: L.shard_batch(h, self.attention.mesh)
    h = shard(L.conv(cfg.block_out_channels[0], 3, dt, "conv_in")(x))
    skips = [h]
    for i, (kind, channels) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
      h, outputs = blocks("down", i, i, channels, kind == CROSS_DOWN, i < n - 1, layers[i],
                          f"down_blocks_{i}")(h, temb, context)
      skips.extend(outputs)

    h = blocks("mid", 0, n - 1, cfg.block_out_channels[-1], True, False, 1,
               "mid_block")(h, temb, context)

    for i, (kind, channels) in enumerate(zip(cfg.up_block_types, cfg.block_out_channels[::-1])):
      block = n - 1 - i
      h, _ = blocks("up", i, block, channels, kind == CROSS_UP, i < n - 1, layers[block] + 1,
                    f"up_blocks_{i}")(h, temb, context, skips)

    h = L.group_norm(cfg.norm_num_groups, cfg.norm_eps, dt, "conv_norm_out")(h, silu=True)
    h = L.conv(cfg.out_channels, 3, dt, "conv_out")(h)
    return shard(h.astype(jnp.float32))
