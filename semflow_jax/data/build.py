"""Build a manual-download dataset (the `tfds build` CLI of tfds 4.9.10 needs apache_beam).

  python -m semflow_jax.data.build cityscapes_semantic --manual_dir=/data/cityscapes \
      --data_dir=/data/tfds

Bad files stop the build with one line naming the file; nothing is left in --data_dir.
"""

import sys

from absl import app, flags

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The unpacked download.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory (default: tfds').")

NAMES = ("coco_stuff", "cityscapes_semantic", "celebamask_hq")


def main(argv):
  if len(argv) != 2 or argv[1] not in NAMES:
    raise app.UsageError(f"expected one dataset name, one of {', '.join(NAMES)}")
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  import tensorflow_datasets as tfds

  from semflow_jax.data import manual  # also registers the builders
  builder = tfds.builder(argv[1], data_dir=_DATA_DIR.value)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=_MANUAL_DIR.value))
  except manual.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except AssertionError as e:  # tfds: the manual directory is missing or empty
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(f"{argv[1]} built in {builder.data_dir}: "
        + ", ".join(f"{k} {v.num_examples}" for k, v in builder.info.splits.items()))


if __name__ == "__main__":
  app.run(main)
