"""SemFlow on your own data: a folder of images and label maps (semflow_jax/data/folder.py).

The folder (local or gs://) holds classes.json, images/ and labels/ (or train/ and validation/,
each with both). On a CPU, in minutes (pixel space, the small UNet, 32x32):

  python -m semflow_jax.main --config=configs/folder.py:local --workdir=runs/my_data \
      --config.data.folder=/data/my_dataset --config.data.num_classes=5

config.data.num_classes must be the number of names in classes.json (a mismatch stops the run
in one line saying so). The tfds dataset is built from the folder on first use (and again when
the folder changes); a multi-process run needs it built beforehand:

  python -m semflow_jax.data.build folder_dataset --manual_dir=/data/my_dataset \
      --data_dir=/data/tfds

The default is the SD-1.5 recipe's layout (real_data.recipe, as for the dataset recipes):
512x512 random square crops, the SD-1.5 UNet and VAE from converted weights, AdamW 2e-5 with a
linear schedule, global batch 128 with FSDP over all chips (the layout planned for 16 chips):

  python -m semflow_jax.main --config=configs/folder.py --workdir=runs/my_data_sd \
      --config.data.folder=gs://my-bucket/my_dataset --config.data.num_classes=5 \
      --config.data.tfds_data_dir=gs://my-bucket/tfds --config.model.init_from=gs://my-bucket/sd15

Without train/ and validation/ sub-folders, `data.validation_fraction` of the examples (0.1)
are held out for evaluation. `:spread` (or `:local,spread`) uses the spread palette
(`real_data.use_spread_palette`), as for the dataset recipes.
"""

import ml_collections
from ml_collections import config_dict

from configs import real_data


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  chosen = real_data.variants("configs/folder.py", arg)
  c = real_data.recipe(name="folder_dataset", num_classes=0, image_size=(512, 512),
                       crop="random", learning_rate=2e-5, num_steps=20_000, schedule="linear",
                       warmup_steps=500)
  c.data.folder = config_dict.placeholder(str)  # classes.json, images/, labels/ (local or gs://)
  c.data.num_classes = config_dict.placeholder(int)  # the number of names in classes.json
  c.data.validation_fraction = 0.1  # held out when the folder has no train/ and validation/
  return real_data.apply_variants(c, chosen, local_size=(32, 32))
