"""SemFlow on CelebAMask-HQ: 512x512, 19 classes, AdamW 2e-5, 80k steps.

The reference recipe (docs/DESIGN.md), from Stable Diffusion 1.5 weights:

  python -m semflow_jax.main --config=configs/celebamask_hq.py --workdir=runs/celebamask_hq \
      --config.data.manual_dir=/data/CelebAMask-HQ --config.model.init_from=/ckpt/sd15

On the slice the layout was planned for (16 chips: a v5e-16 or a v4-32; FSDP over all chips,
remat, splash attention; `python -m semflow_jax.plan --config=configs/celebamask_hq.py
--topology=v5e-16 --programs=train_step` compiles it for that slice and prints its memory
per chip; measured for v5e-16 in benchmarks/RESULTS.md: 5.4 GiB per chip, a predicted 1.03 s
per step from the compiler's per-instruction costs), with the tfds dataset built into a bucket
beforehand:

  launch/tpu.sh train --name=semflow --zone=us-west4-a --spot --accelerator=v5litepod-16 -- \
      --config=configs/celebamask_hq.py \
      --workdir=gs://my-bucket/celebamask_hq --config.data.tfds_data_dir=gs://my-bucket/tfds \
      --config.model.init_from=gs://my-bucket/sd15

`data.manual_dir` holds the unpacked CelebAMask-HQ.zip as semflow_jax/data/celebamask_hq.py
describes (the split is documented there); the tfds dataset is built from it on first use (or
beforehand with `python -m semflow_jax.data.build celebamask_hq --manual_dir=...`). Stored
images are already 512x512, so the square crop is the whole face. `:local` is a minutes-long
pixel-space run at 32x32 with the small UNet, on a CPU:

  python -m semflow_jax.main --config=configs/celebamask_hq.py:local --workdir=runs/celeba_local \
      --config.data.manual_dir=/data/CelebAMask-HQ

`:spread` (or `:local,spread`) swaps the paper's palette (Eq. 7) for the spread one, anchors as
far apart as the colour cube allows, with the default config's perturbation
(`real_data.use_spread_palette`).
"""

import ml_collections

from configs import real_data


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  chosen = real_data.variants("configs/celebamask_hq.py", arg)
  c = real_data.recipe(name="celebamask_hq", num_classes=19, image_size=(512, 512),
                       crop="random", learning_rate=2e-5, num_steps=80_000,
                       schedule="linear", warmup_steps=500)
  return real_data.apply_variants(c, chosen, local_size=(32, 32))
