"""SemFlow on COCO-Stuff-164k: 512x512 square crops, 171 classes, AdamW 1e-5, 320k steps.

The reference recipe (docs/DESIGN.md), from Stable Diffusion 1.5 weights:

  python -m semflow_jax.main --config=configs/coco_stuff.py --workdir=runs/coco_stuff \
      --config.data.manual_dir=/data/coco_stuff --config.model.init_from=/ckpt/sd15

On the slice the layout was planned for (16 chips: a v5e-16 or a v4-32; FSDP over all chips,
remat, splash attention; `python -m semflow_jax.plan --config=configs/coco_stuff.py
--topology=v5e-16 --programs=train_step` compiles it for that slice and prints its memory
per chip; benchmarks/RESULTS.md lists the planner rows measured), with the tfds dataset built
into a bucket beforehand:

  launch/tpu.sh train --name=semflow --zone=us-west4-a --spot --accelerator=v5litepod-16 -- \
      --config=configs/coco_stuff.py \
      --workdir=gs://my-bucket/coco_stuff --config.data.tfds_data_dir=gs://my-bucket/tfds \
      --config.model.init_from=gs://my-bucket/sd15

`data.manual_dir` holds the download as semflow_jax/data/coco_stuff.py describes; the tfds
dataset is built from it on first use (or beforehand with `python -m
semflow_jax.data.build coco_stuff --manual_dir=...`). `:local` is a minutes-long pixel-space run at
32x32 with the small UNet, on a CPU:

  python -m semflow_jax.main --config=configs/coco_stuff.py:local --workdir=runs/coco_local \
      --config.data.manual_dir=/data/coco_stuff

`:spread` (or `:local,spread`) swaps the paper's palette (Eq. 7) for the spread one, anchors as
far apart as the colour cube allows, with the default config's perturbation
(`real_data.use_spread_palette`).
"""

import ml_collections

from configs import real_data


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  chosen = real_data.variants("configs/coco_stuff.py", arg)
  c = real_data.recipe(name="coco_stuff", num_classes=171, image_size=(512, 512), crop="random",
                       learning_rate=1e-5, num_steps=320_000,
                       schedule="constant", warmup_steps=10_000)
  return real_data.apply_variants(c, chosen, local_size=(32, 32))
