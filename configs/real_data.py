"""Shared skeleton of the dataset configs (coco_stuff.py, cityscapes.py, celebamask_hq.py).

Same key structure as configs/synthetic.py (data / model / train / eval / sample / mesh), plus
the keys the real datasets need: data.manual_dir, data.crop, data.crop_scale, an (H, W)
data.image_size; the model section is configs/sd15.py's `model_config()`.
"""

import ml_collections
from ml_collections import config_dict

from configs import sd15, synthetic

DEVICES_IN_REFERENCE = 8  # the reference recipes: batch 16 per device on 8 devices


def recipe(*, name: str, num_classes: int, image_size, crop: str, learning_rate: float,
           num_steps: int, schedule: str, warmup_steps: int,
           grad_accum_steps: int = 1) -> ml_collections.ConfigDict:
  """A full-size reference recipe: SD-1.5 UNet and VAE, AdamW, batch 16 per device."""
  # Start from the default config so every train / eval / sample / mesh key exists here too
  # (command-line overrides work the same everywhere); only the values differ.
  c = synthetic.get_config()

  c.data = ml_collections.ConfigDict()
  c.data.name = name
  c.data.tfds_data_dir = config_dict.placeholder(str)  # None: tfds' default
  c.data.manual_dir = config_dict.placeholder(str)     # the unpacked download; builds if unbuilt
  c.data.image_size = tuple(image_size)                 # (H, W) the model sees
  c.data.num_classes = num_classes
  c.data.crop = crop                # 'random' (square crops) or 'full' (whole frame); see pipeline
  c.data.crop_scale = (1.0, 1.0)    # side of a random crop relative to the largest one
  c.data.flip = True
  # Cached VAE moments of the training images (python -m semflow_jax.data.encode; a random crop
  # is cached as the centre crop, semflow_jax/data/latents.py): a directory, local or gs://.
  c.data.image_latents = config_dict.placeholder(str)

  # SD-1.5 UNet and VAE (configs/sd15.py), bf16 compute and remat; the small pixel-space
  # UNet's keys are there too, for the `:local` variant.
  c.model = sd15.model_config()

  # The layout planned for 16 chips (v5e-16, v4-32): the UNet's parameters and Adam moments
  # sharded over all chips (FSDP), every UNet block rematerialised, splash attention on TPU.
  # Compiled for v5e-16 for celebamask_hq only (benchmarks/RESULTS.md says which rows are
  # measured; `python -m semflow_jax.plan --topology=...` compiles the others).
  c.mesh.data = 1
  c.mesh.fsdp = -1

  c.train.num_steps = num_steps
  c.train.batch_size = 16 * DEVICES_IN_REFERENCE  # global; scale with the device count
  c.train.learning_rate = learning_rate
  c.train.schedule = schedule          # the official recipe's (see the dataset configs)
  c.train.warmup_steps = warmup_steps
  c.train.grad_accum_steps = grad_accum_steps
  c.train.weight_decay = 1e-2
  c.train.log_every = 100
  c.train.checkpoint_every = 2000
  c.train.keep_checkpoints = 3
  c.eval.batch_size = 64
  # The paper's synthesis sampler (the pixel-space default's one RK4 step is tuned there).
  c.eval.synth_steps = 25
  c.eval.synth_method = "euler"
  # Colour alone means little on real photographs and costs host time at 512^2 x 171 classes.
  c.eval.colour_only = False
  return c


def shrink_for_local(c: ml_collections.ConfigDict, image_size) -> ml_collections.ConfigDict:
  """The `:local` variant: pixel space, a small UNet, small images; minutes on a CPU."""
  c.data.image_size = tuple(image_size)
  c.model.autoencoder = "identity"
  c.model.unet = "small"
  c.model.dtype = "float32"
  c.model.remat = False
  c.model.base_channels = 16
  c.model.channel_mult = (1, 2)
  c.model.attention_resolutions = (8,)
  c.model.groups = 8
  c.model.patch_size = 2
  c.train.num_steps = 200
  c.train.batch_size = 8
  c.train.learning_rate = 2e-3
  c.train.warmup_steps = 10
  c.train.schedule = "cosine"
  c.train.grad_accum_steps = 1
  c.mesh.data, c.mesh.fsdp = -1, 1
  c.train.weight_decay = 0.0
  c.train.log_every = 10
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 2
  c.eval.num_examples = 64
  c.eval.batch_size = 8
  c.eval.seg_steps = (1, 2)
  c.eval.synth_steps = 2
  c.eval.synth_method = "euler"
  c.eval.colour_fit_examples = 64
  c.eval.num_sample_images = 4
  c.sample.seg_steps = 2
  c.sample.synth_steps = 2
  return c


VARIANTS = ("local", "spread", "tiny")


def variants(path: str, arg: str) -> set:
  """The config argument: comma-separated variants, e.g. '', 'local', 'spread', 'local,spread'."""
  chosen = set(filter(None, arg.split(",")))
  if chosen - set(VARIANTS):
    raise ValueError(f"unknown {path} argument {arg!r}; expected '' or a comma-separated subset "
                     f"of {VARIANTS}, e.g. 'local,spread'")
  return chosen


def apply_variants(c: ml_collections.ConfigDict, chosen: set, local_size) -> ml_collections.ConfigDict:
  """`local`: shrink_for_local; `tiny`: the same run on configs/sd15.py's tiny SD-shaped model
  at 16x16 (latent space with a VAE in seconds: launch/rehearse.py); `spread`: the default
  config's palette and perturbation."""
  if "local" in chosen and "tiny" in chosen:
    raise ValueError("the 'local' and 'tiny' variants exclude each other")
  if "local" in chosen:
    shrink_for_local(c, local_size)
  if "tiny" in chosen:
    shrink_for_local(c, (16, 16))
    c.model = sd15.model_config(sd15.TINY_UNET, sd15.TINY_VAE, sd15.TINY_CONTEXT_TOKENS,
                                dtype="float32", remat=False)
    c.train.learning_rate = 1e-3
  if "spread" in chosen:
    use_spread_palette(c)
  return c


def use_spread_palette(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The `spread` variant: anchors as far apart as the colour cube allows (19 classes: a
  3x3x3 grid, 2.55x the paper's spacing; 171: a 7-level checkerboard, 1.2x) with the default
  config's perturbation (a fraction of half the spacing, so it carries across palettes). The
  recipes themselves keep the paper's palette, to reproduce its numbers."""
  default = synthetic.get_config().model
  c.model.palette = "spread"
  c.model.perturbation = default.perturbation
  c.model.perturbation_grids = default.perturbation_grids
  return c
