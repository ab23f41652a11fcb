"""Entry point: train, evaluate, segment or synthesise.

  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic --mode=eval
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=segment --input=photo.png --output=mask.png
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=synthesize --input=mask.png --num_samples=4 --output=samples_dir
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=edit --input=photo.png --labels=edited_mask.png --output=edited.png
  ... --mode=synthesize --input=mask.png --style=reference.png --style_strength=0.7 --output=dir
  ... --mode=synthesize --input=mask.png --resample_classes=3,5 --output=dir
  ... --ensemble=runs/seed1,runs/seed2   (segment, synthesize, edit: mean velocity)

Several processes (one per host, or per GPU node) run the same command. Under SLURM (srun) and
on multi-host TPU slices that set TPU_WORKER_HOSTNAMES, jax.distributed is initialised
automatically; --distributed=yes forces it (launch/tpu.sh passes it: JAX then asks the TPU
metadata server for its peers); elsewhere pass --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (process 0 listens on HOST).
"""

import logging as py_logging
import os
import re
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py",
                                          "Config file, optionally with :argument.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs, metrics, samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "segment", "synthesize", "edit"],
                          "train (then evaluate), eval, segment, synthesize or edit.")
_INPUT = flags.DEFINE_string("input", None, "segment, edit: an image; synthesize: a label map "
                             "PNG.")
_OUTPUT = flags.DEFINE_string("output", None, "segment: the label map PNG to write; "
                              "synthesize: the directory to write samples into; edit: the "
                              "edited image PNG to write.")
_NUM_SAMPLES = flags.DEFINE_integer("num_samples", 4, "synthesize: how many images.")
_LABELS = flags.DEFINE_string("labels", None, "edit: the --input photo's label map (as "
                              "--mode=segment wrote it) with some labels changed; 255 = keep.")
_EDIT_METHOD = flags.DEFINE_enum("edit_method", "blend", ["blend", "shift"],
                                 "edit: shift the ODE end point and integrate back ('shift'), "
                                 "and also keep the photo's trajectory outside the edited "
                                 "region at every step ('blend').")
_STYLE = flags.DEFINE_string("style", None, "synthesize: a reference image whose style to "
                             "follow.")
_STYLE_STRENGTH = flags.DEFINE_float("style_strength", None,
                                     "synthesize --style: start time t_s in [0, 1]: 1 = plain "
                                     "synthesis, 0 = the reference (default 0.7).")
_COLOUR_TRANSFER = flags.DEFINE_bool("colour_transfer", False, "synthesize --style: match the "
                                     "reference's Lab mean and standard deviation.")
_REFINE = flags.DEFINE_integer("refine", 0, "synthesize --style: refinement rounds.")
_RESAMPLE_CLASSES = flags.DEFINE_list("resample_classes", None,
                                      "synthesize: new perturbation noise only for these class "
                                      "ids (e.g. 3,5); everything else as the plain sample.")
_RESAMPLE_MASK = flags.DEFINE_string("resample_mask", None, "synthesize: like "
                                     "--resample_classes, for the nonzero pixels of this PNG.")
_RESAMPLE_SEED = flags.DEFINE_integer("resample_seed", None, "synthesize: seed of the new "
                                      "noise (default config.sample.seed + 1).")
_ENSEMBLE = flags.DEFINE_list("ensemble", [], "segment, synthesize, edit: more workdirs whose "
                              "latest checkpoints join --workdir's; the velocity is their mean.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "yes", "no"],
                                 "jax.distributed.initialize(): auto = when SLURM (srun) or a "
                                 "multi-host TPU slice is detected; yes = always (its own "
                                 "cluster auto-detection, e.g. the TPU metadata server).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process: HOST:PORT of process 0 (GPU clusters, CPUs).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this one's index.")
flags.mark_flags_as_required(["workdir"])


def _cluster_detected() -> bool:
  """Launched as one of several processes by srun or on a multi-host Cloud TPU slice."""
  env = os.environ
  if "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
  return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in env


def _initialize_distributed():
  """jax.distributed.initialize() from the flags, or auto-detected; a no-op for one process."""
  import jax
  explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise app.UsageError("--coordinator_address, --num_processes and --process_id go together")
  if _DISTRIBUTED.value == "no" or (_DISTRIBUTED.value == "auto" and explicit[0] is None
                                    and not _cluster_detected()):
    return
  # Collectives between processes on CPU devices go over gloo; accelerators ignore this.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(*explicit)


def _check_storage(config) -> None:
  """Bucket paths this run will use are checked before anything is compiled or written: missing
  credentials, a missing bucket or no answer stop the run with one line naming the path."""
  from semflow_jax import storage
  mode = _MODE.value
  storage.check(_WORKDIR.value, "--workdir", write=mode in ("train", "eval"))
  if mode in ("train", "eval"):
    storage.check(config.data.get("tfds_data_dir"), "config.data.tfds_data_dir")
  if mode == "train":
    storage.check(config.model.get("init_from"), "config.model.init_from")
  if mode in ("segment", "synthesize"):
    storage.check(_INPUT.value, "--input")
    if _OUTPUT.value:  # segment writes a file, synthesize a directory of them
      output = storage.parent(_OUTPUT.value) if mode == "segment" else _OUTPUT.value
      storage.check(output, "--output", write=True)


class _QuietLibraries(py_logging.Filter):
  """Orbax and tfds log every file they touch at INFO; keep their warnings and errors, except
  those that alarm without cause: every read-only checkpoint manager (sampling, --mode=eval)
  says "Given directory is read only" (which reads like a permissions problem) and that it
  changes options it does not use, and checkpoint.py's choice of array writer says it
  overrides Orbax's default."""

  MISLEADING = ("Given directory is read only", "CheckpointManagerOptions.read_only=True",
                "Type handler registry type")

  def filter(self, record):
    noisy = any(part in record.pathname for part in ("/orbax/", "/tensorflow_datasets/"))
    if noisy and str(record.msg).startswith(self.MISLEADING):
      return False
    return record.levelno >= py_logging.WARNING or not noisy


def _parse_flags(argv):
  """absl's flag parsing, except that a config override naming no key (--config.train.num_stepz)
  ends in one line with ml_collections' suggestion instead of a traceback."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    text = str(e)
    hint = re.search(r'Did you mean "(\w+)" instead of "(\w+)"', text)
    name = hint.group(2) if hint else next(iter(re.findall(r"\w+", text)), "?")
    for arg in argv[1:]:
      path = arg.split("=", 1)[0][len("--config."):].split(".")
      if arg.startswith("--config.") and name in path:
        key = ".".join(path[:path.index(name) + 1])
        guess = ".".join(path[:path.index(name)] + [hint.group(1)]) if hint else None
        print(f"error: {arg}: the config has no key {key}" +
              (f" (did you mean {guess}?)" if guess else ""), file=sys.stderr)
        break
    else:
      print(f"error: a --config. override names no key of the config: {text}", file=sys.stderr)
    sys.exit(2)
  except flags.Error as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from semflow_jax import runtime
  runtime.skip_absent_tpus()  # before anything starts JAX: no TPU start-up without TPUs
  logging.get_absl_handler().addFilter(_QuietLibraries())
  from semflow_jax import storage
  config = _CONFIG.value
  try:
    _check_storage(config)
  except storage.StorageError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  # TF is only the input pipeline: keep it off any accelerator JAX should own.
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  import jax
  _initialize_distributed()

  from semflow_jax import checkpoint, sample, evaluate, train
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  try:
    if _ENSEMBLE.value and _MODE.value in ("train", "eval"):
      raise sample.InputError(f"--ensemble is for segment, synthesize and edit, not "
                              f"--mode={_MODE.value} (benchmarks/controls.py measures ensembles)")
    if _MODE.value == "train":
      train.train_and_evaluate(config, _WORKDIR.value)
    elif _MODE.value == "eval":
      evaluate.evaluate(config, _WORKDIR.value)
    elif _MODE.value == "segment":
      sample.segment_file(config, _WORKDIR.value, _INPUT.value, _OUTPUT.value, _ENSEMBLE.value)
    elif _MODE.value == "edit":
      sample.edit_file(config, _WORKDIR.value, _INPUT.value, _LABELS.value, _OUTPUT.value,
                       _EDIT_METHOD.value, _ENSEMBLE.value)
    else:
      sample.synthesize_file(
          config, _WORKDIR.value, _INPUT.value, _OUTPUT.value, _NUM_SAMPLES.value,
          _ENSEMBLE.value, style=_STYLE.value, style_strength=_STYLE_STRENGTH.value,
          colour_transfer=_COLOUR_TRANSFER.value, refine=_REFINE.value,
          resample_classes=_RESAMPLE_CLASSES.value, resample_mask=_RESAMPLE_MASK.value,
          resample_seed=_RESAMPLE_SEED.value)
  except (sample.InputError, FileNotFoundError,  # bad input file, or no checkpoint yet
          checkpoint.IncompatibleCheckpointError, checkpoint.ConversionError,
          storage.StorageError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if jax.process_count() > 1:
    # Leave together: a process that tears down the distributed runtime while a peer is still
    # in its last collective (or still saving) can leave that peer waiting forever.
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices("semflow_jax.main finished")
    jax.distributed.shutdown()


if __name__ == "__main__":
  # Before TensorFlow loads (flag parsing loads the config): keep its C++ INFO chatter and its
  # oneDNN notice off the console (oneDNN speeds up matrix products and convolutions, which the
  # input pipeline does not run: its batches are identical without it).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  app.run(main, flags_parser=_parse_flags)
