"""Surviving pod-scale training on one machine: a real two-process run, SIGTERM and kill -9
during a save with exact resume, non-finite steps, and a workdir of another model."""

import glob
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from semflow_jax import checkpoint, parallel, state as state_lib, train
from semflow_jax.data import pipeline
from tests.conftest import REPO, free_port, run_together

NUM_STEPS = 20
# The reference run's overrides, shared by every run compared with it.
OVERRIDES = {"train.num_steps": NUM_STEPS, "train.log_every": 1, "train.checkpoint_every": 5,
             "train.eval_every": 0}


def _config(tfds_dir, **extra):
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.data.tfds_data_dir = tfds_dir
  for key, value in {**OVERRIDES, **extra}.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _cli(workdir, tfds_dir, *extra):
  return ([sys.executable, "-m", "semflow_jax.main", "--config=configs/synthetic.py:tiny",
           f"--workdir={workdir}", f"--config.data.tfds_data_dir={tfds_dir}"]
          + [f"--config.{k}={v}" for k, v in OVERRIDES.items()] + list(extra))


def _env(devices, cache=True):
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
  if not cache:
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
  return env


def _logged(workdir, tag="train/loss"):
  """{step: value} of a scalar over every TensorBoard event file in `workdir`."""
  values = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.tag == tag:
          values[event.step] = float(tf.make_ndarray(v.tensor))
  return values


def _steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def _params(config, workdir):
  params, step = state_lib.load_params(config, workdir, parallel.make_mesh(config))
  return jax.device_get(params), step


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tfds_dir):
  """An uninterrupted one-process run on 8 devices: its final params and logged losses."""
  config = _config(tfds_dir)
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.train_and_evaluate(config, workdir)
  params, step = _params(config, workdir)
  assert step == NUM_STEPS
  losses = _logged(workdir)
  assert sorted(losses) == list(range(1, NUM_STEPS + 1))
  return params, losses, workdir


def _assert_bitwise(params, reference_params):
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(reference_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigterm_saves_the_current_step_and_the_rerun_continues_exactly(reference, tfds_dir,
                                                                          tmp_path, monkeypatch):
  ref_params, ref_losses, _ = reference
  config = _config(tfds_dir)
  workdir = str(tmp_path / "preempted")
  real_iterator = pipeline.TrainIterator

  class PreemptedIterator(real_iterator):
    def __next__(self):
      if self.position == 7:  # the scheduler's SIGTERM arrives while step 8 is being fed
        os.kill(os.getpid(), signal.SIGTERM)
      return super().__next__()

  monkeypatch.setattr(pipeline, "TrainIterator", PreemptedIterator)
  handler = signal.getsignal(signal.SIGTERM)
  result = train.train_and_evaluate(config, workdir)
  monkeypatch.setattr(pipeline, "TrainIterator", real_iterator)
  assert result == {"step": 8, "preempted": True}
  assert _steps(workdir) == [5, 8]  # the regular one and the one at the preemption step
  assert signal.getsignal(signal.SIGTERM) is handler  # ours is removed again

  train.train_and_evaluate(config, workdir)  # the same call again
  params, step = _params(config, workdir)
  assert step == NUM_STEPS
  _assert_bitwise(params, ref_params)
  assert _logged(workdir) == ref_losses


def test_kill_9_during_a_save_restarts_from_the_previous_complete_checkpoint(reference, tfds_dir,
                                                                              tmp_path):
  ref_params, ref_losses, _ = reference
  workdir = str(tmp_path / "killed")
  cmd = _cli(workdir, tfds_dir, "--config.train.checkpoint_every=1")
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(8), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  in_flight, deadline = None, time.time() + 240
  while in_flight is None and proc.poll() is None and time.time() < deadline:
    # Orbax writes <step>.orbax-checkpoint-tmp-* and renames it to <step> when complete.
    partial = glob.glob(os.path.join(ckpt_dir, "*.orbax-checkpoint-tmp*"))
    steps = [int(os.path.basename(p).split(".")[0]) for p in partial]
    if steps and max(steps) >= 4:
      proc.send_signal(signal.SIGKILL)
      in_flight = max(steps)
    time.sleep(0.005)
  proc.wait()
  assert in_flight is not None, "the run ended before a save could be interrupted"
  assert glob.glob(os.path.join(ckpt_dir, f"{in_flight}.orbax-checkpoint-tmp*"))  # mid-save
  complete = _steps(workdir)
  assert complete and complete[-1] < in_flight, (complete, in_flight)

  rerun = subprocess.run(cmd, cwd=REPO, env=_env(8), capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"starting at step {complete[-1]} of {NUM_STEPS}" in rerun.stderr
  assert not glob.glob(os.path.join(ckpt_dir, "*.orbax-checkpoint-tmp*"))  # cleaned up
  params, step = _params(_config(tfds_dir), workdir)
  assert step == NUM_STEPS
  _assert_bitwise(params, ref_params)
  logged = _logged(workdir)
  assert {s: logged[s] for s in ref_losses} == ref_losses


def test_two_processes_on_localhost_match_one_process(reference, tfds_dir, tmp_path):
  ref_params, ref_losses, _ = reference
  workdir = str(tmp_path / "two_processes")
  address = f"127.0.0.1:{free_port()}"
  # No shared compilation cache: JAX writes it from process 0 only; both should do equal work.
  ran = run_together([_cli(workdir, tfds_dir, f"--coordinator_address={address}",
                           "--num_processes=2", f"--process_id={i}") for i in range(2)],
                     [_env(4, cache=False)] * 2, tmp_path, timeout=400)
  procs, outputs = [p for p, _ in ran], [out for _, out in ran]
  for p, out in ran:
    assert p.returncode == 0, out[-3000:]
  assert "process 1/2" in outputs[1] and "mesh {'data': 8, 'fsdp': 1}" in outputs[1]

  # Only process 0 wrote TensorBoard events (the file name holds the writer's pid).
  events = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert len(events) == 1 and f".{procs[0].pid}." in os.path.basename(events[0]), events
  losses = _logged(workdir)
  assert sorted(losses) == sorted(ref_losses)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [ref_losses[s] for s in sorted(ref_losses)], rtol=1e-5)
  # The collectively written checkpoint reads back in one process, close to the reference.
  params, step = _params(_config(tfds_dir), workdir)
  assert step == NUM_STEPS
  flat, flat_ref = jax.tree.leaves(params), jax.tree.leaves(ref_params)
  diff = np.sqrt(sum(np.sum((np.asarray(a) - b) ** 2) for a, b in zip(flat, flat_ref)))
  assert diff / np.sqrt(sum(np.sum(np.square(b)) for b in flat_ref)) < 1e-5


def test_non_finite_loss_stops_at_its_step_or_is_skipped(tfds_dir, tmp_path):
  # warmup_steps=2: the learning rate is 0 at step 1 and 1e30 at step 2, so the update of step 2
  # blows the parameters up and the loss of step 3 is the first non-finite one.
  config = _config(tfds_dir, **{"train.learning_rate": 1e30, "train.checkpoint_every": 1,
                                "train.num_steps": 6})
  assert config.train.warmup_steps == 2
  workdir = str(tmp_path / "diverged")
  with pytest.raises(FloatingPointError, match="at step 3;.*last good checkpoint is kept"):
    train.train_and_evaluate(config, workdir)
  assert _steps(workdir) == [1, 2]
  good, step = _params(config, workdir)
  assert step == 2 and all(np.isfinite(x).all() for x in jax.tree.leaves(good))

  config.train.skip_nonfinite = True
  skipping = str(tmp_path / "skipping")
  train.train_and_evaluate(config, skipping)
  skipped = _logged(skipping, "train/skipped_steps")
  assert [skipped[s] for s in sorted(skipped)] == [0, 0, 1, 2, 3, 4]
  params, step = _params(config, skipping)
  assert step == 6
  _assert_bitwise(params, good)  # no update after step 2 was applied


def test_a_workdir_of_another_model_is_refused_and_left_untouched(reference, tfds_dir):
  _, _, workdir = reference
  before = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(workdir, "**"),
                                                       recursive=True)}
  config = _config(tfds_dir, **{"model.base_channels": 8})
  with pytest.raises(checkpoint.IncompatibleCheckpointError,
                     match=r"parameter params/unet/conv_in/bias has shape \(16,\) in the "
                           r"checkpoint, \(8,\) in this config"):
    train.train_and_evaluate(config, workdir)
  after = {p: os.path.getmtime(p) for p in glob.glob(os.path.join(workdir, "**"),
                                                     recursive=True)}
  assert after == before
  # The CLI says the same in one line and exits 2.
  proc = subprocess.run(_cli(workdir, tfds_dir, "--config.model.base_channels=8"), cwd=REPO,
                        env=_env(1), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "params/unet/conv_in/bias" in errors[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
