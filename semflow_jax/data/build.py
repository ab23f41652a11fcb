"""Build a manual-download dataset as ArrayRecord files, in parallel shards.

  python -m semflow_jax.data.build cityscapes_semantic --manual_dir=/data/cityscapes \
      --data_dir=/data/tfds --processes=8

The examples are written in shards of --examples_per_shard, by --processes local processes and,
optionally, by several machines sharing the work: run the same command on each with
--num_workers=N --worker_index=i (every machine needs the unpacked download at --manual_dir;
`launch/tpu.sh build-data` does this on every TPU worker). Each shard goes into a staging
directory beside the dataset; worker 0 waits for all of them and then makes the dataset visible
at once (records.py). An interrupted build leaves no dataset that looks complete: run the same
command again and only the missing shards are written.

  python -m semflow_jax.data.build folder_dataset --manual_dir=/data/my_dataset \
      --validation_fraction=0.1 --data_dir=/data/tfds

Bad files stop the build with one line naming the file; nothing is left in --data_dir.
--data_dir may be a bucket (`gs://bucket/tfds`: build once, every TPU worker reads it);
--manual_dir is a local directory (the unpacked download), or for `folder_dataset` your folder
(local or gs://; semflow_jax/data/folder.py), whose --validation_fraction must be the
config's `data.validation_fraction`.
"""

import os
import sys

from absl import app, flags

from semflow_jax import cli

_MANUAL_DIR = flags.DEFINE_string("manual_dir", None, "The unpacked download.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "tfds data directory, local or gs:// "
                                "(default: tfds').")
_SHARDS = cli.define_shard_flags("writing", "build", "dataset")
_VALIDATION_FRACTION = flags.DEFINE_float("validation_fraction", 0.1, "folder_dataset without "
                                          "train/ and validation/: the validation share.")

NAMES = ("coco_stuff", "cityscapes_semantic", "celebamask_hq", "folder_dataset")


def main(argv):
  if len(argv) != 2 or argv[1] not in NAMES:
    raise app.UsageError(f"expected one dataset name, one of {', '.join(NAMES)}")
  options = dict(_SHARDS.options(), log=print)
  from semflow_jax import runtime, storage
  runtime.configure_process()  # building needs no TPU: no TPU start-up without TPUs
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

  from semflow_jax.data import folder, manual, records  # also registers the builders
  try:
    if argv[1] == folder.NAME:
      built = folder.prepare(folder.builder(_MANUAL_DIR.value, _VALIDATION_FRACTION.value,
                                            data_dir), **options)
    else:
      builder = tfds.builder(argv[1], data_dir=data_dir)
      if builder.is_prepared():
        print(f"{argv[1]} is already built in {builder.data_path}")
        return
      built = records.build(builder, os.path.abspath(_MANUAL_DIR.value), **options)
  except manual.DataError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if built is None:
    print(f"{argv[1]}: worker {options['worker_index']} of {options['num_workers']} wrote its "
          "shards; worker 0 makes the dataset visible when all are written")
    return
  print(f"{argv[1]} built in {built.data_path}: "
        + ", ".join(f"{k} {v.num_examples}" for k, v in built.info.splits.items()))


if __name__ == "__main__":
  app.run(main)
