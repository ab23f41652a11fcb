"""Entry point: train, evaluate, segment or synthesise.

  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic --mode=eval
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=segment --input=photo.png --output=mask.png
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=synthesize --input=mask.png --num_samples=4 --output=samples_dir
"""

import sys

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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
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
  except sample.InputError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  app.run(main)
