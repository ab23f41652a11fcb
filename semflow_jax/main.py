"""Entry point: train, evaluate, segment or synthesise.

  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic --mode=eval
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=segment --input=photo.png --output=mask.png
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=synthesize --input=mask.png --num_samples=4 --output=samples_dir
"""

import logging as py_logging
import os
import sys

# Before TensorFlow loads: keep its C++ INFO chatter off the console.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py",
                                          "Config file, optionally with :argument.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs, metrics, samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "segment", "synthesize"],
                          "train (then evaluate), eval, segment or synthesize.")
_INPUT = flags.DEFINE_string("input", None, "segment: an image; synthesize: a label map PNG.")
_OUTPUT = flags.DEFINE_string("output", None, "segment: the label map PNG to write; "
                              "synthesize: the directory to write samples into.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "synthesize: how many images.")
flags.mark_flags_as_required(["workdir"])


class _QuietLibraries(py_logging.Filter):
  """Orbax and tfds log every file they touch at INFO; keep their warnings and errors."""

  def filter(self, record):
    noisy = any(part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/"))
    return record.levelno >= py_logging.WARNING or not noisy


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  # TF is only the input pipeline: keep it off any accelerator JAX should own.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  import jax

  from semflow_jax import sample, evaluate, train
  config = _CONFIG.value
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  try:
    if _MODE.value == "train":
      train.train_and_evaluate(config, _WORKDIR.value)
    elif _MODE.value == "eval":
      evaluate.evaluate(config, _WORKDIR.value)
    elif _MODE.value == "segment":
      sample.segment_file(config, _WORKDIR.value, _INPUT.value, _OUTPUT.value)
    else:
      sample.synthesize_file(config, _WORKDIR.value, _INPUT.value, _OUTPUT.value,
                             _NUM_SAMPLES.value)
  except (sample.InputError, FileNotFoundError) as e:  # bad input file, or no checkpoint yet
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
