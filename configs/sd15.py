"""SemFlow on Stable Diffusion v1.5: the paper's model (latent space, SD-1.5 UNet and VAE).

Convert the SD-1.5 folder once (diffusers layout), then train from it:

  python -m semflow_jax.convert --diffusers_dir=/data/stable-diffusion-v1-5 --output=/data/sd15_flax
  python -m semflow_jax.main --config=configs/sd15.py --workdir=runs/sd15 \
      --config.model.init_from=/data/sd15_flax

This file also exports `model_config()`, the model section that the dataset configs
(configs/coco_stuff.py, ...) use, and the SD-1.5 `UNET` / `VAE` architecture dicts (the
published `config.json` values). Variants: `:tiny` is a random-weight SD-shaped model for tests
(its `TINY_UNET` / `TINY_VAE` describe the diffusers folder the tests build).
"""

import ml_collections
from ml_collections import config_dict

from configs import synthetic

# runwayml/stable-diffusion-v1-5 unet/config.json (architecture keys).
UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                    "CrossAttnUpBlock2D"),
    layers_per_block=2, attention_head_dim=8, cross_attention_dim=768,
    use_linear_projection=False, flip_sin_to_cos=True, freq_shift=0, norm_num_groups=32,
    norm_eps=1e-5, downsample_padding=1, mid_block_scale_factor=1.0)
# runwayml/stable-diffusion-v1-5 vae/config.json.
VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4, norm_num_groups=32, scaling_factor=0.18215)
CONTEXT_TOKENS = 77  # CLIP ViT-L/14 text length

# A random-weight SD-shaped model small enough for CPU tests (latents at 1/2 resolution).
TINY_UNET = dict(
    in_channels=4, out_channels=4, block_out_channels=(16, 32),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
    attention_head_dim=2, cross_attention_dim=16, norm_num_groups=8)
TINY_VAE = dict(
    in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    latent_channels=4, norm_num_groups=4, scaling_factor=0.18215)
TINY_CONTEXT_TOKENS = 8


def model_config(unet=UNET, vae=VAE, context_tokens=CONTEXT_TOKENS,
                 dtype="bfloat16", remat=True) -> ml_collections.ConfigDict:
  """The `config.model` section for SemFlow on an SD-shaped UNet and VAE."""
  m = synthetic.get_config().model  # same keys, so command-line overrides work everywhere
  m.autoencoder = "sd_vae"
  m.unet = "sd"
  m.unet_config = ml_collections.ConfigDict(dict(unet))
  m.vae_config = ml_collections.ConfigDict(dict(vae))
  m.context_tokens = context_tokens
  m.init_from = config_dict.placeholder(str)
  m.dtype = dtype
  m.remat = remat
  # The paper's anchors and Eq. 14 amplitude (beta = 0.1), to reproduce its numbers.
  m.palette = "paper"
  m.perturbation = 0.255   # anchors.PAPER_PERTURBATION: beta = 0.1 in [-1, 1] units
  m.perturbation_grids = (0,)  # per-pixel noise, as in the paper's Eq. 14
  return m


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  c = synthetic.get_config()
  if arg == "tiny":
    c = synthetic.get_config("tiny")
    c.model = model_config(TINY_UNET, TINY_VAE, TINY_CONTEXT_TOKENS, dtype="float32",
                           remat=False)
    c.train.learning_rate = 1e-3
    return c
  if arg:
    raise ValueError(f"unknown configs/sd15.py argument {arg!r}; expected '' or 'tiny'")
  # The built-in synthetic scenes at 256^2 (32^2 latents): a quick check of a converted model.
  c.data.image_size = 256
  c.data.num_train = 5000
  c.model = model_config()
  c.train.num_steps = 20000
  c.train.batch_size = 16
  c.train.learning_rate = 2e-5     # the paper's range (1e-5 .. 5e-5) for fine-tuning SD-1.5
  c.train.warmup_steps = 500
  c.train.ema_decay = 0.9999
  c.train.checkpoint_every = 2000
  c.eval.batch_size = 16
  c.eval.num_examples = 500
  # The paper's sampler for synthesis (the pixel-space default's one RK4 step is tuned there).
  c.eval.synth_steps = 25
  c.eval.synth_method = "euler"
  return c
