"""Build a manual-download dataset (the `tfds build` CLI of tfds 4.9.10 needs apache_beam).

  python -m semflow_jax.data.build cityscapes_semantic --manual_dir=/data/cityscapes \
      --data_dir=/data/tfds

  python -m semflow_jax.data.build folder_dataset --manual_dir=/data/my_dataset \
      --validation_fraction=0.1 --data_dir=/data/tfds

Bad files stop the build with one line naming the file; nothing is left in --data_dir.
--data_dir may be a bucket (`gs://bucket/tfds`: build once, every TPU worker reads it);
--manual_dir is a local directory (the unpacked download), or for `folder_dataset` your folder
(local or gs://; semflow_jax/data/folder.py), whose --validation_fraction must be the
config's `data.validation_fraction`.
"""

import sys

from absl import app, flags

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The unpacked download.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory, local or gs:// "
                                "(default: tfds').")
_VALIDATION_FRACTION = flags.DEFINE_float("validation_fraction", 0.1, "folder_dataset without "
                                          "train/ and validation/: the validation share.")

NAMES = ("coco_stuff", "cityscapes_semantic", "celebamask_hq", "folder_dataset")


def main(argv):
  if len(argv) != 2 or argv[1] not in NAMES:
    raise app.UsageError(f"expected one dataset name, one of {', '.join(NAMES)}")
  from semflow_jax import storage
  data_dir = _DATA_DIR.value and storage.resolve(_DATA_DIR.value)
  try:
    if storage.is_url(_MANUAL_DIR.value) and argv[1] != "folder_dataset":
      raise storage.StorageError(f"--manual_dir={_MANUAL_DIR.value}: must be a local directory "
                                 "(unpack the download on this machine's disk)")
    storage.check(data_dir, "--data_dir", write=True)
  except storage.StorageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  import tensorflow_datasets as tfds

  from semflow_jax.data import folder, manual  # also registers the builders
  try:
    if argv[1] == folder.NAME:
      builder = folder.prepare(folder.builder(_MANUAL_DIR.value, _VALIDATION_FRACTION.value,
                                              data_dir))
    else:
      builder = tfds.builder(argv[1], data_dir=data_dir)
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
