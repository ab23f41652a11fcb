"""train_and_evaluate(config, workdir): the training loop.

State is created sharded on the mesh, the step is jitted with the state donated, metrics stay on
the device until a log step, checkpoints are written asynchronously by Orbax, and re-running the
same command resumes from the latest checkpoint. Training ends with an evaluation.
"""

import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers

from semflow_jax import checkpoint, evaluate, parallel, state as state_lib
from semflow_jax.data import pipeline
from semflow_jax.semflow import SemFlow


def make_train_step(model: SemFlow, tx: optax.GradientTransformation, config):
  schedule = state_lib.learning_rate_schedule(config)
  ema_decay = config.train.ema_decay

  def train_step(state: state_lib.TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, grads = jax.value_and_grad(model.loss)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      # e + (1 - d)(p - e) leaves frozen parameters (p == e) bit-identical.
      ema = jax.tree.map(lambda e, p: e + (1 - ema_decay) * (p - e), ema, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads),
               "param_norm": optax.tree.norm(params), "learning_rate": schedule(state.step)}
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema)
    return new_state, metrics

  return train_step


def _format_duration(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Train (resuming from `workdir` if it holds a checkpoint), then evaluate; returns metrics."""
  t = config.train
  workdir = os.path.abspath(workdir)
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = parallel.make_mesh(config)
  per_process_batch = parallel.batch_size_per_process(t.batch_size, mesh)
  model = SemFlow.from_config(config)
  tx = state_lib.make_optimizer(config)
  logging.info("mesh %s; global batch %d (%d per process)", dict(mesh.shape), t.batch_size,
               per_process_batch)

  manager = checkpoint.make_manager(workdir, t.keep_checkpoints)
  restored = checkpoint.restore_latest(manager, state_lib.abstract(model, tx, config, mesh))
  state, data_state = restored if restored else (state_lib.create(model, tx, config, mesh), None)
  start_step = int(state.step)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info("UNet parameters: %s; starting at step %d of %d", f"{num_params:,}", start_step,
               t.num_steps)

  builder = pipeline.get_builder(config.data)
  preprocess = pipeline.Preprocess.from_config(config.data)
  if data_state is None:
    train_iter = pipeline.TrainIterator(builder, per_process_batch, config.seed, 0,
                                        config.data.flip, preprocess=preprocess)
  else:
    train_iter = pipeline.TrainIterator.from_state(builder, data_state, per_process_batch,
                                                   config.seed, config.data.flip,
                                                   preprocess=preprocess)
  replicated = parallel.replicated(mesh)
  train_step = jax.jit(make_train_step(model, tx, config),
                       in_shardings=(replicated, parallel.batch_sharding(mesh)),
                       out_shardings=(replicated, replicated), donate_argnums=0)

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  if start_step == 0 and is_main:
    writer.write_hparams({k: v for k, v in _flatten(config.to_dict()).items()
                          if isinstance(v, (int, float, str, bool))})

  pending, last_log_time, last_log_step = [], time.time(), start_step
  try:
    for step in range(start_step + 1, t.num_steps + 1):
      batch = parallel.to_global(next(train_iter), mesh)
      state, step_metrics = train_step(state, batch)
      pending.append(step_metrics)

      if step % t.log_every == 0 or step == t.num_steps:
        # One host transfer per log interval, not per step.
        logged = {k: float(np.mean(v)) for k, v in
                  jax.device_get(jax.tree.map(lambda *xs: jnp.stack(xs), *pending)).items()}
        pending = []
        if not np.isfinite(logged["loss"]) or not np.isfinite(logged["grad_norm"]):
          raise FloatingPointError(
              f"non-finite loss {logged['loss']} or grad norm {logged['grad_norm']} by step {step}; "
              f"the last good checkpoint is kept in {manager.directory}")
        now = time.time()
        steps_per_sec = (step - last_log_step) / (now - last_log_time)
        last_log_time, last_log_step = now, step
        logged["steps_per_sec"] = steps_per_sec
        logged["examples_per_sec"] = steps_per_sec * t.batch_size
        writer.write_scalars(step, {f"train/{k}": v for k, v in logged.items()})
        logging.info("step %d/%d  loss %.4f  grad_norm %.3f  lr %.2e  %.2f steps/s  ETA %s",
                     step, t.num_steps, logged["loss"], logged["grad_norm"],
                     logged["learning_rate"], steps_per_sec,
                     _format_duration((t.num_steps - step) / max(steps_per_sec, 1e-9)))

      if step % t.checkpoint_every == 0 or step == t.num_steps:
        checkpoint.save(manager, step, state, train_iter.state())

      if (t.eval_every and step % t.eval_every == 0) and step != t.num_steps:
        evaluate.run(model, _eval_params(state), builder, config, mesh, step, workdir, writer)
  finally:
    # Also on Ctrl-C or an error: let in-flight asynchronous saves complete.
    manager.wait_until_finished()
    manager.close()
  final = int(state.step)
  result = evaluate.run(model, _eval_params(state), builder, config, mesh, final, workdir, writer)
  writer.close()
  return result


def _eval_params(state):
  return state.ema_params if state.ema_params is not None else state.params


def _flatten(d, prefix=""):
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out
