"""train_and_evaluate(config, workdir): the training loop.

State is created sharded on the mesh (parameters and optimiser state replicated or FSDP-sharded,
see parallel.py), the step is compiled ahead of time with the state donated, metrics stay on the
device until a log step, checkpoints are written asynchronously by Orbax, and re-running the
same command resumes from the latest checkpoint. SIGTERM (TPU maintenance, SLURM, Kubernetes)
saves a checkpoint at the current step and returns; a non-finite loss or gradient is never
applied: it stops the run (or, with train.skip_nonfinite, is counted and skipped). Training
ends with an evaluation.
"""

import signal
import threading
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from semflow_jax import checkpoint, evaluate, flops, job, metric_writer, parallel, runtime
from semflow_jax import state as state_lib, step as step_lib, storage
from semflow_jax.data import latents as latents_lib, pipeline
from semflow_jax.step import compile_train_step
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow


class Preemption:
  """Has a stop been requested (SIGTERM), and is this the point to stop at?

  `reached()` is asked at the same points on every process: after every train step and between
  evaluation batches. One process: a SIGTERM handler sets a flag. Several (`job.in_job()`):
  a SIGTERM to any process is a request to the job; the processes' watcher threads agree
  through the coordination service on one call of `reached()` at which every process answers
  True (`job.stop_point_reached`), so all of them stop and save together, even when one
  is blocked in a collective or runs calls ahead of another (asynchronous dispatch). Not JAX's
  preemption sync point: Orbax's CheckpointManager asks that one too, with step numbers, and
  moved its counter under ours (the hang of issue #28).

  The handler stays installed until `close()`, after the last save and the last evaluation: a
  SIGTERM that arrives while the final checkpoint is being written lets the write finish.
  """

  def __init__(self):
    self.requested = False
    self._previous = None
    self._multi = job.in_job()
    if not self._multi and jax.process_count() > 1:
      logging.warning("several processes without job.start_job (semflow_jax.main calls "
                      "it): a SIGTERM ends this process instead of stopping the job together")
    elif not self._multi and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

  def _on_sigterm(self, signum, frame):
    self.requested = True

  def reached(self) -> bool:
    if self._multi:
      return job.stop_point_reached()
    return self.requested

  def close(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train (resuming from `workdir` if it holds a checkpoint), then evaluate; returns metrics.

  Returns {'step': k, 'preempted': True} without evaluating when SIGTERM stopped the run.
  """
  t = config.train
  workdir = storage.resolve(workdir)  # a gs:// URL stays a URL
  mesh = parallel.make_mesh(config)
  micro_batches = t.get("grad_accum_steps", 1)
  per_process_batch = parallel.batch_size_per_process(t.batch_size, mesh, micro_batches)
  model = SemFlow.from_config(config, mesh)
  tx = state_lib.make_optimizer(config)
  logging.info("mesh %s; global batch %d (%d per process, %d micro-batches)", dict(mesh.shape),
               t.batch_size, per_process_batch, micro_batches)
  profile = _Profile(t, workdir)
  manager = checkpoint.make_manager(workdir, t.keep_checkpoints)
  train_iter = writer = preemption = None
  try:
    # Restore before writing anything: a workdir of another model is refused, never overwritten.
    state, data_state, abstract_state = _restore_or_create(manager, model, tx, config, mesh)
    start_step = int(state.step)
    builder = pipeline.get_builder(config.data)
    # Cached latents are checked against this run's VAE and data before anything is written.
    image_latents = _image_latents(config, builder, model, state)
    if jax.process_index() == 0:
      storage.write_text(storage.join(workdir, "config.json"),
                         config.to_json_best_effort(indent=2))
    train_iter = _train_iterator(builder, config, per_process_batch, data_state, image_latents)
    train_step, step_flops, evaluator = _compile(model, tx, config, mesh, abstract_state,
                                                 builder, train_iter.element_spec)
    writer = metric_writer.for_run(workdir, config)
    if start_step == 0 and jax.process_index() == 0 and t.get("tensorboard", True):
      writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                            if isinstance(v, (int, float, str, bool))})
    log = _TrainLog(t, writer, step_flops, mesh.devices.flat[0], start_step, manager.directory)
    preemption = Preemption()

    def evaluate_at(step):
      """The evaluation of `step`, or None when a SIGTERM stopped it (it runs after the resume)."""
      return evaluator(_eval_params(state), step, workdir, writer, should_stop=preemption.reached)

    def save(step):
      checkpoint.save(manager, step, state, train_iter.state(), model.checkpoint_record())

    stopped_at = None  # the step a SIGTERM stopped the run at (saved)
    job.note_step(start_step)
    if _evaluation_pending(t, start_step, workdir) and evaluate_at(start_step) is None:
      stopped_at = start_step  # stopped again before that evaluation finished
    for step in range(start_step + 1, t.num_steps + 1) if stopped_at is None else ():
      profile.before(step)
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = parallel.to_global(next(train_iter), mesh)
        state, step_metrics = train_step(state, batch)
      log.add(step, step_metrics)
      job.note_step(step)
      profile.after(step, step_metrics)
      stop = preemption.reached()

      if step % t.log_every == 0 or step == t.num_steps or stop:
        log.write(step)

      saved = step % t.checkpoint_every == 0 or step == t.num_steps or stop
      if saved:
        log.check()  # never save after a step that must stop the run
        save(step)

      if not stop and t.eval_every and step % t.eval_every == 0 and step != t.num_steps:
        if evaluate_at(step) is None:
          stop = True
          if not saved:
            save(step)
          logging.warning("preemption (SIGTERM) during the evaluation of step %d: it runs again "
                          "after the resume", step)

      if stop:
        logging.warning("preemption (SIGTERM): saved step %d in %s; re-run the same command to "
                        "continue", step, manager.directory)
        stopped_at = step
        break

    # Training is over: stop its input now. Destroying the tf.data iterator waits for
    # tf.data's threads, which after the minutes of a final evaluation took 39.5-54 s (py-spy:
    # every sample in TrainIterator.close, a resumed run's exit); right after a step it is quick.
    train_iter.close()
    # The last checkpoint is complete before the final evaluation starts (a SIGTERM meanwhile
    # is only noted: the write finishes).
    manager.wait_until_finished()
    if stopped_at is None:
      result = evaluate_at(int(state.step))
      if result is not None:
        return result
      stopped_at = int(state.step)
      logging.warning("preemption (SIGTERM) during the final evaluation: step %d is saved; "
                      "re-run the same command to evaluate it", stopped_at)
    return {"step": stopped_at, "preempted": True}
  finally:
    profile.stop()  # stopped inside the traced steps
    # Also on Ctrl-C or an error: let in-flight asynchronous saves complete.
    manager.wait_until_finished()
    manager.close()
    if preemption is not None:  # after the last save: a SIGTERM meanwhile lets it finish
      preemption.close()
    if writer is not None:
      writer.close()
    if train_iter is not None:
      # The input pipeline's threads work ahead of the loop; stop them now rather than when
      # the iterator is collected (a tf.data iterator waits for its workers there).
      train_iter.close()


def _restore_or_create(manager, model: SemFlow, tx, config: ml_collections.ConfigDict, mesh):
  """(train state, data stream state or None, abstract state): the latest checkpoint in
  `manager`'s directory (refused if it is another model's), else a new sharded state."""
  abstract_state = state_lib.abstract(model, tx, config, mesh)
  state_lib.check_resumable(manager)
  restored = checkpoint.restore_latest(manager, abstract_state, model.checkpoint_record())
  state, data_state = restored if restored else (state_lib.create(model, tx, config, mesh), None)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("UNet parameters: %s; train state %.1f MiB per device; starting at step %d of %d",
               f"{num_params:,}", parallel.bytes_per_device(abstract_state) / 2**20,
               int(state.step), config.train.num_steps)
  return state, data_state, abstract_state


def _train_iterator(builder, config: ml_collections.ConfigDict, per_process_batch: int,
                    data_state, image_latents) -> pipeline.TrainIterator:
  """The training input from its start, or where the checkpointed `data_state` left off
  (with the cached image moments `image_latents` in place of images, when not None)."""
  preprocess = pipeline.Preprocess.from_config(config.data)
  if data_state is None:
    return pipeline.TrainIterator(builder, per_process_batch, config.seed, 0, config.data.flip,
                                  preprocess=preprocess, latents=image_latents)
  return pipeline.TrainIterator.from_state(builder, data_state, per_process_batch, config.seed,
                                           config.data.flip, preprocess=preprocess,
                                           latents=image_latents)


def _compile(model: SemFlow, tx, config: ml_collections.ConfigDict, mesh, abstract_state,
             builder, element_spec: dict):
  """(train step, its FLOPs per device, the run's evaluator), all compiled before any data is
  read: a sharding or shape error, or a program that does not fit, shows now, not at step 1
  (nor hours later, at the first evaluation)."""
  batch_spec = {k: ((config.train.batch_size, *shape[1:]), dtype)
                for k, (shape, dtype) in element_spec.items()}
  compile_start = time.time()
  train_step, step_flops = compile_train_step(model, tx, config, mesh, abstract_state,
                                              batch_spec)
  logging.info("train step compiled in %.1f s (%.3g TFLOP per device per step)",
               time.time() - compile_start, step_flops / 1e12)
  # One set of inference programs and one evaluator per run: evaluations never recompile.
  evaluator = evaluate.Evaluator(config, model, Programs(model), builder, mesh)
  compile_start = time.time()
  evaluator.compile(_eval_params(abstract_state))
  logging.info("evaluation programs compiled in %.1f s (compilation cache: %s)",
               time.time() - compile_start, runtime.compilation_cache_use())
  checkpoint.wait_for_all_processes("semflow_jax.train: step compiled")
  return train_step, step_flops, evaluator


class _TrainLog:
  """The train step's metrics stay on the device until a log step (one host transfer per log
  interval, not per step); a non-finite step stops the run unless train.skip_nonfinite."""

  def __init__(self, t: ml_collections.ConfigDict, writer, step_flops: float, device,
               start_step: int, checkpoint_dir):
    self.t, self.writer, self.step_flops, self.device = t, writer, step_flops, device
    self.checkpoint_dir = checkpoint_dir
    self.pending = []  # (step, metrics on the device) since the last host check
    self.last_time, self.last_step = time.time(), start_step

  def add(self, step: int, metrics) -> None:
    self.pending.append((step, metrics))

  def check(self):
    """Fetch the pending metrics: (steps, metrics), or None if there are none. Raises
    FloatingPointError at a non-finite step unless skipping is allowed."""
    if not self.pending:
      return None
    steps = [s for s, _ in self.pending]
    fetched = jax.device_get([m for _, m in self.pending])
    self.pending = []
    bad = [s for s, m in zip(steps, fetched) if not m["finite"]]
    if bad and not self.t.get("skip_nonfinite", False):
      first = fetched[steps.index(bad[0])]
      raise FloatingPointError(
          f"non-finite loss ({first['loss']}) or gradient norm ({first['grad_norm']}) at step "
          f"{bad[0]}; the update was not applied and no checkpoint was written after it. The last "
          f"good checkpoint is kept in {self.checkpoint_dir} (set train.skip_nonfinite=True to "
          "skip such steps instead)")
    if bad:
      logging.warning("skipped non-finite update(s) at step(s) %s", bad)
    return steps, fetched

  def write(self, step: int) -> None:
    """The means since the last log step, the rates and the FLOP utilisation, to TensorBoard
    and one log line."""
    t = self.t
    _, fetched = self.check()  # pyright: ignore[reportGeneralTypeIssues]
    logged = {k: float(np.mean([m[k] for m in fetched if m["finite"]] or [np.nan]))
              for k in ("loss", "grad_norm", "param_norm")}
    logged["learning_rate"] = float(fetched[-1]["learning_rate"])
    logged["skipped_steps"] = int(fetched[-1]["skipped"])
    now = time.time()
    steps_per_sec = (step - self.last_step) / (now - self.last_time)
    self.last_time, self.last_step = now, step
    logged["steps_per_sec"] = steps_per_sec
    logged["examples_per_sec"] = steps_per_sec * t.batch_size
    # FLOP utilisation from the compiled step's FLOPs (flops.py) and the measured time,
    # against the chip's bf16 peak (TPUs; none known elsewhere).
    logged["tflops_per_chip"] = self.step_flops * steps_per_sec / 1e12
    if flops.peak_flops(self.device):
      logged["mfu"] = flops.mfu(self.step_flops, 1.0 / steps_per_sec, self.device)
    self.writer.write_scalars(step, {f"train/{k}": v for k, v in logged.items()})
    logging.info("step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.2f steps/s  ETA %s",
                 step, t.num_steps, logged["loss"], logged["grad_norm"],
                 logged["learning_rate"], steps_per_sec,
                 _format_duration((t.num_steps - step) / max(steps_per_sec, 1e-9)))


class _Profile:
  """config.train.profile_steps=(first, last): a jax.profiler trace of those steps in
  <workdir>/profile."""

  def __init__(self, t: ml_collections.ConfigDict, workdir: str):
    self.first, self.last = _profile_steps(t)
    self.workdir = workdir
    self.tracing = False

  def before(self, step: int) -> None:
    if step == self.first:
      self.tracing = True
      jax.profiler.start_trace(storage.join(self.workdir, "profile"), create_perfetto_trace=True)

  def after(self, step: int, metrics) -> None:
    if step == self.last:
      jax.block_until_ready(metrics)
      jax.profiler.stop_trace()
      self.tracing = False
      logging.info("profile of steps %d-%d written to %s/profile (README: Profiling)",
                   self.first, self.last, self.workdir)

  def stop(self) -> None:
    """End a trace still running (the run stopped inside the traced steps)."""
    if self.tracing:
      jax.profiler.stop_trace()
      self.tracing = False


def _image_latents(config, builder, model, state):
  """The cached image moments of config.data.image_latents, checked against this run's VAE,
  image size, crop, flips and dataset (data/latents.py), or None."""
  if not step_lib.uses_image_latents(config):
    return None
  if not model.has_vae:
    raise latents_lib.LatentsError(
        f"config.data.image_latents={config.data.image_latents}: config.model.autoencoder is "
        f"{config.model.autoencoder!r}; cached latents are the SD VAE's")
  cached = latents_lib.open_latents(config.data.image_latents)
  # Every process computes the fingerprint (a collective) and checks the same file.
  cached.check(latents_lib.describe(config, builder, model,
                                    latents_lib.fingerprint(state.frozen["vae"])))
  logging.info("training from the image latents in %s", cached.path)
  return cached


def _evaluation_pending(t, step: int, workdir: str) -> bool:
  """Did the run stop (SIGTERM, or killed) during the evaluation of `step`, its last checkpoint?
  Its metrics are then missing and the evaluation runs before training continues."""
  if not (t.eval_every and 0 < step < t.num_steps and step % t.eval_every == 0):
    return False
  missing = not storage.exists(storage.join(workdir, "eval", f"metrics_{step}.json"))
  # Process 0 writes the metrics; every process must take the same (collective) path.
  return bool(multihost_utils.broadcast_one_to_all(np.asarray(missing)))


def _profile_steps(t) -> tuple:
  """config.train.profile_steps: () for none, or (first, last), the steps to trace."""
  steps = tuple(t.get("profile_steps", ()) or ())
  if not steps:
    return 0, -1
  if len(steps) != 2 or not 1 <= steps[0] <= steps[1]:
    raise ValueError(f"config.train.profile_steps={steps!r}: expected (first, last) with "
                     "1 <= first <= last, e.g. (10, 14)")
  return steps


def _eval_params(state):
  return state.model_params()


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
