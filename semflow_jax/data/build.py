"""Build a manual-download dataset (the `tfds build` CLI of tfds 4.9.10 needs apache_beam).

  python -m semflow_jax.data.build cityscapes_semantic --manual_dir=/data/cityscapes \
      --data_dir=/data/tfds

Bad files stop the build with one line naming the file; nothing is left in --data_dir.
--data_dir may be a bucket (`gs://bucket/tfds`: build once, every TPU worker reads it);
--manual_dir is a local directory (the unpacked download).
"""

import sys

from absl import app, flags

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The unpacked download.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory, local or gs:// "
                                "(default: tfds').")

NAMES = ("coco_stuff", "cityscapes_semantic", "celebamask_hq")


def main(argv):
  if len(argv) != 2 or argv[1] not in NAMES:
    raise app.UsageError(f"expected one dataset name, one of {', '.join(NAMES)}")
  from semflow_jax import storage
  data_dir = _DATA_DIR.value and storage.resolve(_DATA_DIR.value)
  try:
    if storage.is_url(_MANUAL_DIR.value):
      raise storage.StorageError(f"--manual_dir={_MANUAL_DIR.value}: must be a local directory "
                                 "(unpack the download on this machine's disk)")
    storage.check(data_dir, "--data_dir", write=True)
  except storage.StorageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  import tensorflow_datasets as tfds

  from semflow_jax.data import manual  # also registers the builders
  builder = tfds.builder(argv[1], data_dir=data_dir)
  try:
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(
            manual_dir=storage.resolve(_MANUAL_DIR.value)))
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
