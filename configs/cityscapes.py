"""SemFlow on Cityscapes: full frames at 512x1024, 19 classes, AdamW 5e-5, 8k steps.

The reference recipe (docs/DESIGN.md), from Stable Diffusion 1.5 weights:

  python -m semflow_jax.main --config=configs/cityscapes.py --workdir=runs/cityscapes \
      --config.data.manual_dir=/data/cityscapes --config.model.init_from=/ckpt/sd15

On the slice the layout was planned for (16 chips: a v5e-16 or a v4-32; FSDP over all chips,
remat, 2 micro-batches, splash attention; `python -m semflow_jax.plan --config=configs/cityscapes.py
--topology=v5e-16 --programs=train_step` compiles it for that slice and prints its memory
per chip; benchmarks/RESULTS.md lists the planner rows measured), with the tfds dataset built
into a bucket beforehand:

  launch/tpu.sh train --name=semflow --zone=us-west4-a --spot --accelerator=v5litepod-16 -- \
      --config=configs/cityscapes.py \
      --workdir=gs://my-bucket/cityscapes --config.data.tfds_data_dir=gs://my-bucket/tfds \
      --config.model.init_from=gs://my-bucket/sd15

`data.manual_dir` holds leftImg8bit/ and gtFine/ as semflow_jax/data/cityscapes.py describes;
the tfds dataset is built from it on first use (or beforehand with `python -m
semflow_jax.data.build cityscapes_semantic --manual_dir=...`). The 2048x1024 images are
resized whole (no crop) to 1024x512. `:local` is a minutes-long pixel-space run at 32x64 with
the small UNet, on a CPU:

  python -m semflow_jax.main --config=configs/cityscapes.py:local --workdir=runs/cityscapes_local \
      --config.data.manual_dir=/data/cityscapes

`:spread` (or `:local,spread`) swaps the paper's palette (Eq. 7) for the spread one, anchors as
far apart as the colour cube allows, with the default config's perturbation
(`real_data.use_spread_palette`).
"""

import ml_collections

from configs import real_data


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  chosen = real_data.variants("configs/cityscapes.py", arg)
  c = real_data.recipe(name="cityscapes_semantic", num_classes=19, image_size=(512, 1024),
                       crop="full", learning_rate=5e-5, num_steps=8_000,
                       schedule="linear", warmup_steps=500, grad_accum_steps=2)
  return real_data.apply_variants(c, chosen, local_size=(32, 64))
