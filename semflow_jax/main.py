"""Entry point: train, evaluate, segment or synthesise.

  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic --mode=eval
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=segment --input=photo.png --output=mask.png
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=synthesize --input=mask.png --num_samples=4 --output=samples_dir
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=edit --input=photo.png --labels=edited_mask.png --output=edited.png
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=segment --input=photos/ --output=predictions/      # a folder (or a glob)
  python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic \
      --mode=segment --split=validation --output=predictions/   # the config's dataset
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

from absl import app, flags, logging
from ml_collections import config_flags

from semflow_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py",
                                          "Config file, optionally with :argument.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, TensorBoard logs, metrics, samples.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval", "segment", "synthesize", "edit"],
                          "train (then evaluate), eval, segment, synthesize or edit.")
_INPUT = flags.DEFINE_string("input", None, "segment, edit: an image; synthesize: a label map "
                             "PNG. segment, synthesize: or a folder (every image / PNG below "
                             "it) or a glob ('photos/*.jpg'), all in one run.")
_OUTPUT = flags.DEFINE_string("output", None, "segment of one image: the label map PNG to "
                              "write (not a directory); synthesize of one label map: the "
                              "directory for sample_<i>.png (not a file); edit: the edited "
                              "image PNG; a folder, glob or --split: the directory for the "
                              "outputs of every input (labels/<name>.png, <name>_<i>.png).")
_SPLIT = flags.DEFINE_string("split", None, "segment, synthesize: every example of this split "
                             "of the config's dataset (e.g. validation) instead of --input.")
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
  """Every bucket path this mode will read or write is checked before anything is compiled or
  written: missing credentials, a missing bucket or no answer stop the run with one line naming
  the path."""
  from semflow_jax import storage
  mode = _MODE.value
  storage.check(_WORKDIR.value, "--workdir", write=mode in ("train", "eval"))
  if mode in ("train", "eval"):
    storage.check(config.data.get("tfds_data_dir"), "config.data.tfds_data_dir")
    if mode == "train":
      storage.check(config.data.get("image_latents"), "config.data.image_latents")
    for key in ("fid_weights", "lpips_weights"):
      storage.check(config.eval.get(key), f"config.eval.{key}")
    reference = config.eval.get("fid_reference")
    if reference:  # written on first use
      storage.check(storage.parent(reference), "config.eval.fid_reference", write=True)
  if mode == "train":
    storage.check(config.model.get("init_from"), "config.model.init_from")
  cache = config.get("compilation_cache")
  if cache and str(cache).lower() not in ("off", "none", "false"):
    storage.check(cache, "config.compilation_cache", write=True)
  if mode in ("segment", "synthesize", "edit"):
    storage.check(_INPUT.value, "--input")
    if _SPLIT.value:
      storage.check(config.data.get("tfds_data_dir"), "config.data.tfds_data_dir")
    storage.check(_LABELS.value, "--labels")
    storage.check(_STYLE.value, "--style")
    storage.check(_RESAMPLE_MASK.value, "--resample_mask")
    for i, workdir in enumerate(_ENSEMBLE.value):
      storage.check(workdir, f"--ensemble (member {i + 1})")
    if _OUTPUT.value:  # segment of one image writes a file, the others a directory of them
      from semflow_jax import sample_many
      one_file = mode == "edit" or (
          mode == "segment" and not sample_many.is_many(_INPUT.value, _SPLIT.value))
      output = storage.parent(_OUTPUT.value) if one_file else _OUTPUT.value
      storage.check(output, "--output", write=True)


def _check_dataset(config):
  """A folder dataset's config against its classes.json (the folder exists, num_classes is the
  number of classes listed), before anything is loaded; the problem in one line, or None."""
  if config.data.name != "folder_dataset":
    return None
  from semflow_jax.data import folder
  try:
    folder.check_config(config.data)
  except folder.FolderError as e:
    return str(e)
  return None


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from semflow_jax import job, runtime
  config = _CONFIG.value
  mode = _MODE.value
  # Before anything starts JAX. The cache lives in the workdir for training and evaluation; it
  # is written at the first compile, so a command refused below leaves nothing there.
  runtime.configure_process(config, _WORKDIR.value if mode in ("train", "eval") else None)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  import jax
  from semflow_jax import storage
  _initialize_distributed()
  # Before the job watcher starts: a peer that fails at once cannot end this process before it
  # has said who it is and what it sees.
  logging.info("JAX %s, process %d/%d, devices: %s", jax.__version__, jax.process_index(),
               jax.process_count(), jax.devices())
  # From here on every exit goes through semflow_jax.job, so the other processes of a job learn
  # why this one stopped instead of waiting for it.
  job.start_job()
  try:
    _check_storage(config)
  except storage.StorageError as e:
    job.fail_job(2, f"error: {e}")
  problem = _check_dataset(config)
  if problem:
    job.fail_job(2, f"error: {problem}")
  if mode == "eval" and not storage.is_dir(storage.join(_WORKDIR.value, "checkpoints")):
    job.fail_job(2, f"error: no checkpoint in {_WORKDIR.value}/checkpoints; train first "
                     f"with --mode=train --workdir={_WORKDIR.value}")
  if mode in ("train", "eval") or _SPLIT.value:
    # TF is only the input pipeline (loaded only by the modes that read a dataset: a few
    # seconds less for segmenting files): keep it off any accelerator JAX should own.
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")

  from semflow_jax import checkpoint, sample, sample_many
  from semflow_jax.image_files import InputError
  from semflow_jax.data import latents, manual
  try:
    if _ENSEMBLE.value and mode in ("train", "eval"):
      raise InputError(f"--ensemble is for segment, synthesize and edit, not "
                              f"--mode={mode} (benchmarks/controls.py measures ensembles)")
    if _SPLIT.value and mode not in ("segment", "synthesize"):
      raise InputError(f"--split is for segment and synthesize, not --mode={mode}")
    many = mode in ("segment", "synthesize") and sample_many.is_many(_INPUT.value, _SPLIT.value)
    if many and (_STYLE.value or _RESAMPLE_CLASSES.value or _RESAMPLE_MASK.value):
      raise InputError("--style and --resample_* are for one --input label map, not a "
                              "folder, glob or --split")
    if mode == "train":
      from semflow_jax import train
      train.train_and_evaluate(config, _WORKDIR.value)
    elif mode == "eval":
      from semflow_jax import evaluate
      evaluate.evaluate(config, _WORKDIR.value)
    elif mode == "segment" and many:
      sample_many.segment_many(config, _WORKDIR.value, _INPUT.value, _OUTPUT.value, _ENSEMBLE.value,
                          _SPLIT.value)
    elif mode == "synthesize" and many:
      sample_many.synthesize_many(config, _WORKDIR.value, _INPUT.value, _OUTPUT.value,
                             _NUM_SAMPLES.value, _ENSEMBLE.value, _SPLIT.value)
    elif mode == "segment":
      sample.segment_file(config, _WORKDIR.value, _INPUT.value, _OUTPUT.value, _ENSEMBLE.value)
    elif mode == "edit":
      sample.edit_file(config, _WORKDIR.value, _INPUT.value, _LABELS.value, _OUTPUT.value,
                       _EDIT_METHOD.value, _ENSEMBLE.value)
    else:
      sample.synthesize_file(
          config, _WORKDIR.value, _INPUT.value, _OUTPUT.value, _NUM_SAMPLES.value,
          _ENSEMBLE.value, style=_STYLE.value, style_strength=_STYLE_STRENGTH.value,
          colour_transfer=_COLOUR_TRANSFER.value, refine=_REFINE.value,
          resample_classes=_RESAMPLE_CLASSES.value, resample_mask=_RESAMPLE_MASK.value,
          resample_seed=_RESAMPLE_SEED.value)
  except (InputError, FileNotFoundError,  # bad input file, or no checkpoint yet
          manual.DataError,  # a dataset file (or a folder dataset's classes.json) is bad
          latents.LatentsError,  # config.data.image_latents are not this run's
          checkpoint.IncompatibleCheckpointError, checkpoint.ConversionError,
          storage.StorageError) as e:
    job.fail_job(2, f"error: {e}")
  except KeyboardInterrupt:
    job.fail_job(130, "error: interrupted (Ctrl-C)")
  except Exception as e:  # a bug, or a collective that failed because a peer did
    if jax.process_count() == 1:
      raise
    job.fail_job(1, f"error: {type(e).__name__}: {e}", unexpected=e)
  job.finish_job()


def run_and_exit(argv) -> None:
  """main(), then the process ends at once with status 0.

  Every file is written and closed when main() returns (Orbax's manager closed, the metric
  writer closed, storage writes synchronous), so the interpreter's own teardown only frees
  memory: its final garbage collection of the run's objects (jax executables and arrays, TF's
  graphs) took up to 39.5 s after a resumed run's last file (py-spy: every sample in
  `gc_collect_main`). A job's exit is what a scheduler, a TPU watcher and the next command
  wait for; skip it.
  """
  main(argv)
  import sys
  logging.flush()
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  os._exit(0)


if __name__ == "__main__":
  # Before TensorFlow loads (flag parsing loads the config): keep its C++ INFO chatter and its
  # oneDNN notice off the console (oneDNN speeds up matrix products and convolutions, which the
  # input pipeline does not run: its batches are identical without it).
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  app.run(run_and_exit, flags_parser=cli.parse_flags)
