"""A PyTorch twin of `semflow_jax.models.unet.UNet` (the default config's pixel-space UNet) and
of SemFlow's training loss, written the way the official PyTorch code trains: NCHW tensors,
`nn.Module`s, `loss.backward()`, `clip_grad_norm_`, `torch.optim.AdamW`.

The twin has the same layers, shapes and parameter count as the Linen module, and
`load_flax_params` copies a Flax parameter tree into it, so the two compute the same function
(tests/test_torch_twin.py checks the outputs agree). benchmarks/run.py times both train steps
side by side.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semflow_jax import anchors


def timestep_embedding(timesteps, dim: int, max_period: float = 10000.0):
  half = dim // 2
  freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half)
  args = timesteps.float()[:, None] * freqs[None]
  return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
  def __init__(self, cin: int, cout: int, groups: int, temb_dim: int):
    super().__init__()
    self.norm1 = nn.GroupNorm(groups, cin, eps=1e-6)
    self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
    self.time_proj = nn.Linear(temb_dim, 2 * cout)
    self.norm2 = nn.GroupNorm(groups, cout, eps=1e-6)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
    self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else None

  def forward(self, x, temb):
    h = self.conv1(F.silu(self.norm1(x)))
    scale, shift = self.time_proj(F.silu(temb))[:, :, None, None].chunk(2, dim=1)
    h = self.norm2(h) * (1 + scale) + shift
    h = self.conv2(F.silu(h))
    return (self.skip(x) if self.skip is not None else x) + h


class SelfAttention(nn.Module):
  def __init__(self, channels: int, heads: int, groups: int):
    super().__init__()
    self.heads = heads
    self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
    self.attn = nn.ModuleDict({k: nn.Linear(channels, channels)
                               for k in ("query", "key", "value", "out")})

  def forward(self, x):
    b, c, h, w = x.shape
    y = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
    split = lambda t: t.view(b, h * w, self.heads, c // self.heads).transpose(1, 2)
    q, k, v = (split(self.attn[name](y)) for name in ("query", "key", "value"))
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(c // self.heads), dim=-1)
    y = self.attn["out"]((weights @ v).transpose(1, 2).reshape(b, h * w, c))
    return x + y.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Conv2d):
  """Stride-2 3x3 conv with Flax's 'SAME' padding (nothing on top/left, one row/column on
  bottom/right), so the twin computes exactly what nn.Conv(strides=2) does."""

  def __init__(self, channels: int):
    super().__init__(channels, channels, 3, stride=2)

  def forward(self, x):
    return super().forward(F.pad(x, (0, 1, 0, 1)))


class UNet(nn.Module):
  """Same arguments and architecture as the Linen `UNet`; NCHW in and out. Submodules carry the
  Linen module's names (`down_0_res_0`, `mid_attn`, ...), in `self.blocks` in forward order."""

  def __init__(self, out_channels: int, base_channels: int = 64, channel_mult=(1, 2, 2),
               num_res_blocks: int = 2, attention_resolutions=(8,), num_heads: int = 4,
               groups: int = 16, patch_size: int = 1, in_channels: int = 3,
               image_size: int = 32):
    super().__init__()
    p, c0 = patch_size, base_channels
    self.p, self.base_channels = p, c0
    temb_dim = 4 * c0
    self.time_mlp_0, self.time_mlp_1 = nn.Linear(c0, temb_dim), nn.Linear(temb_dim, temb_dim)
    self.conv_in = nn.Conv2d(in_channels * p * p, c0, 3, padding=1)
    blocks, self.skip_after = {}, set()  # down blocks whose output the up path concatenates
    res, ch, skips = image_size // p, c0, [c0]
    for level, mult in enumerate(channel_mult):
      for i in range(num_res_blocks):
        blocks[f"down_{level}_res_{i}"] = ResBlock(ch, c0 * mult, groups, temb_dim)
        ch = c0 * mult
        if res in attention_resolutions:
          blocks[f"down_{level}_attn_{i}"] = SelfAttention(ch, num_heads, groups)
        self.skip_after.add(next(reversed(blocks)))
        skips.append(ch)
      if level < len(channel_mult) - 1:
        blocks[f"down_{level}_downsample"] = Downsample(ch)
        self.skip_after.add(f"down_{level}_downsample")
        skips.append(ch)
        res //= 2
    blocks["mid_res_0"] = ResBlock(ch, ch, groups, temb_dim)
    blocks["mid_attn"] = SelfAttention(ch, num_heads, groups)
    blocks["mid_res_1"] = ResBlock(ch, ch, groups, temb_dim)
    for level, mult in reversed(list(enumerate(channel_mult))):
      for i in range(num_res_blocks + 1):
        blocks[f"up_{level}_res_{i}"] = ResBlock(ch + skips.pop(), c0 * mult, groups, temb_dim)
        ch = c0 * mult
        if res in attention_resolutions:
          blocks[f"up_{level}_attn_{i}"] = SelfAttention(ch, num_heads, groups)
      if level > 0:
        blocks[f"up_{level}_upsample"] = nn.Conv2d(ch, ch, 3, padding=1)
        res *= 2
    self.blocks = nn.ModuleDict(blocks)
    self.norm_out = nn.GroupNorm(groups, ch, eps=1e-6)
    self.conv_out = nn.Conv2d(ch, out_channels * p * p, 3, padding=1)

  def forward(self, x, timesteps):
    temb = timestep_embedding(timesteps, self.base_channels)
    temb = self.time_mlp_1(F.silu(self.time_mlp_0(temb)))
    h = self.conv_in(_space_to_depth(x, self.p))
    skips = [h]
    for name, block in self.blocks.items():
      if name.startswith("up_") and "_res_" in name:
        h = torch.cat([h, skips.pop()], dim=1)
      if "_res_" in name:
        h = block(h, temb)
      elif name.endswith("upsample"):
        h = block(F.interpolate(h, scale_factor=2, mode="nearest"))
      else:
        h = block(h)
      if name in self.skip_after:
        skips.append(h)
    h = self.conv_out(F.silu(self.norm_out(h)))
    return _depth_to_space(h, self.p)


def _space_to_depth(x, p: int):
  """NCHW; channels ordered (row in patch, column in patch, channel) as in the Linen UNet."""
  if p == 1:
    return x
  b, c, h, w = x.shape
  x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 3, 5, 1, 2, 4)
  return x.reshape(b, p * p * c, h // p, w // p)


def _depth_to_space(x, p: int):
  if p == 1:
    return x
  b, c, h, w = x.shape
  x = x.reshape(b, p, p, c // (p * p), h, w).permute(0, 3, 4, 1, 5, 2)
  return x.reshape(b, c // (p * p), h * p, w * p)


def from_config(config) -> UNet:
  m = config.model
  return UNet(out_channels=3, base_channels=m.base_channels, channel_mult=tuple(m.channel_mult),
              num_res_blocks=m.num_res_blocks,
              attention_resolutions=tuple(m.attention_resolutions), num_heads=m.num_heads,
              groups=m.groups, patch_size=m.patch_size, image_size=config.data.image_size)


def load_flax_params(model: UNet, params) -> None:
  """Copy the Linen UNet's parameters (SemFlow's `params['unet']`) into the twin."""
  count = 0

  def visit(tree, module):
    nonlocal count
    for key, value in tree.items():
      if hasattr(value, "items"):
        child = model.blocks[key] if module is model and key in model.blocks else \
            (module[key] if isinstance(module, nn.ModuleDict) else getattr(module, key))
        visit(value, child)
      else:
        _copy_param(module, key, np.asarray(value))
        count += 1

  visit(params, model)
  if count != len(list(model.parameters())):
    raise ValueError(f"copied {count} Flax parameters into {len(list(model.parameters()))}")


def _copy_param(module, leaf, value):
  if isinstance(module, nn.GroupNorm):
    target = module.weight if leaf == "scale" else module.bias
  else:
    target = module.weight if leaf == "kernel" else module.bias
    if leaf == "kernel" and isinstance(module, nn.Conv2d):
      value = value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
    elif leaf == "kernel":  # Dense (in, out) or DenseGeneral (in, H, D) / (H, D, out)
      value = value.reshape(target.shape[1], target.shape[0]).T
    else:
      value = value.reshape(-1)
  if tuple(target.shape) != value.shape:
    raise ValueError(f"{type(module).__name__}.{leaf}: twin {tuple(target.shape)}, "
                     f"Flax {value.shape}")
  with torch.no_grad():
    target.copy_(torch.from_numpy(np.array(value, np.float32)))


class TwinTrainer:
  """SemFlow's training step in PyTorch: render and perturb the anchor image, sample t,
  interpolate, MSE on the flow target, backward, clip the global norm, AdamW."""

  def __init__(self, model: UNet, config, seed: int = 0):
    t = config.train
    self.model = model.train()
    self.optimizer = torch.optim.AdamW(model.parameters(), lr=t.learning_rate, betas=(0.9, 0.999),
                                       weight_decay=t.weight_decay)
    self.grad_clip = t.grad_clip
    # The config's palette; Eq. 14's amplitude is a fraction of half its anchor spacing.
    palette = anchors.make_palette(config.model.get("palette", "paper"), config.data.num_classes)
    self.amplitude = config.model.perturbation * palette.half_spacing
    self.table = torch.from_numpy(np.asarray(palette.table(), np.float32))
    self.generator = torch.Generator().manual_seed(seed)

  def step(self, images_uint8, labels_uint8):
    """NHWC uint8 tensors, as the data pipeline delivers them."""
    z0 = images_uint8.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    anchor = self.table[labels_uint8[..., 0].long()].permute(0, 3, 1, 2)
    noise = 2.0 * torch.rand(anchor.shape, generator=self.generator) - 1.0
    z1 = anchor + self.amplitude * noise
    t = torch.rand(z0.shape[0], generator=self.generator)
    zt = (1 - t[:, None, None, None]) * z0 + t[:, None, None, None] * z1
    self.optimizer.zero_grad(set_to_none=True)
    loss = F.mse_loss(self.model(zt, 1000 * t), z1 - z0)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
    self.optimizer.step()
    return loss.detach()
