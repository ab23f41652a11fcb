"""Surviving pod-scale training on one machine: a real two-process run, SIGTERM and kill -9
during a save with exact resume, non-finite steps, and a workdir of another model."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from jax.sharding import NamedSharding, PartitionSpec as P

from semflow_jax import checkpoint, parallel, state as state_lib, train
from semflow_jax.data import pipeline
from semflow_jax.semflow import SemFlow
from tests.conftest import REPO, free_port

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


def test_sigterm_while_the_last_checkpoint_is_written_keeps_it(reference, tfds_dir, tmp_path,
                                                               monkeypatch):
  """SIGTERM as the final step's (asynchronous) save begins: the save completes, the final
  evaluation is left for the rerun, and the rerun starts from that checkpoint and evaluates it."""
  ref_params, _, _ = reference
  config = _config(tfds_dir, **{"train.checkpoint_every": 100})  # no earlier checkpoint
  workdir = str(tmp_path / "final")
  save = checkpoint.save

  def save_then_sigterm(manager, step, *args, **kwargs):
    save(manager, step, *args, **kwargs)
    if step == NUM_STEPS:  # the (asynchronous) write has just begun in Orbax's threads
      os.kill(os.getpid(), signal.SIGTERM)

  monkeypatch.setattr(checkpoint, "save", save_then_sigterm)
  handler = signal.getsignal(signal.SIGTERM)
  assert train.train_and_evaluate(config, workdir) == {"step": NUM_STEPS, "preempted": True}
  monkeypatch.setattr(checkpoint, "save", save)
  assert signal.getsignal(signal.SIGTERM) is handler
  assert _steps(workdir) == [NUM_STEPS]
  assert not glob.glob(os.path.join(workdir, "checkpoints", "*.orbax-checkpoint-tmp*"))
  params, step = _params(config, workdir)
  assert step == NUM_STEPS
  _assert_bitwise(params, ref_params)
  assert not os.path.exists(os.path.join(workdir, "eval", f"metrics_{NUM_STEPS}.json"))

  result = train.train_and_evaluate(config, workdir)  # the rerun: nothing to train, evaluates
  assert result["step"] == NUM_STEPS and "preempted" not in result
  assert json.load(open(os.path.join(workdir, "eval", f"metrics_{NUM_STEPS}.json")))["step"] \
      == NUM_STEPS


def test_kill_9_during_a_save_restarts_from_the_previous_complete_checkpoint(reference, tfds_dir,
                                                                              tmp_path):
  ref_params, ref_losses, _ = reference
  workdir = str(tmp_path / "killed")
  cmd = _cli(workdir, tfds_dir, "--config.train.checkpoint_every=1")
  proc = subprocess.Popen(cmd, cwd=REPO, env=_env(8), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  in_flight, deadline = None, time.time() + 500  # a ceiling against hangs
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


# Parameters, Adam moments and EMA sharded over all 8 devices of two processes (the recipes'
# layout): every tensor of 64 elements or more is split.
FSDP = ("--config.mesh.data=1", "--config.mesh.fsdp=-1", "--config.mesh.fsdp_min_size=64")


def _start(workdir, tfds_dir, log_dir, faults, *extra, devices=4, env=None):
  """Start one job of len(faults) processes on localhost, process i with fault faults[i] (see
  tests/faults.py; '' for none); _wait collects it. Output goes to files in `log_dir`, not
  pipes: a process blocked on a full pipe stalls its peers."""
  address = f"127.0.0.1:{free_port()}"
  fault_log = os.path.join(log_dir, "faults.log")
  if os.path.exists(fault_log):
    os.remove(fault_log)
  env = {**_env(devices), "SEMFLOW_FAULT_LOG": fault_log, **(env or {})}
  procs, logs = [], []
  for i, fault in enumerate(faults):
    multi = [f"--coordinator_address={address}", f"--num_processes={len(faults)}",
             f"--process_id={i}"] if len(faults) > 1 else []
    cmd = ([sys.executable, "-m", "tests.faults", fault] + _cli(workdir, tfds_dir, *extra, *multi)[3:])
    logs.append(open(os.path.join(log_dir, f"process_{i}.log"), "w+"))
    procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=logs[-1],
                                  stderr=subprocess.STDOUT))
  return procs, logs, fault_log


def _wait(job, timeout=900):
  """[(returncode, output, exit time)] of a job from _start, and its faults' times. `timeout` is
  a ceiling against hangs, not a speed check: a process still running then is killed (and
  its return code is negative)."""
  procs, logs, fault_log = job
  ended = [None] * len(procs)
  deadline = time.time() + timeout
  while None in ended and time.time() < deadline:
    for i, p in enumerate(procs):
      if ended[i] is None and p.poll() is not None:
        ended[i] = time.time()  # pyright: ignore[reportCallIssue]
    time.sleep(0.1)
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.wait()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  fired = {}
  if os.path.exists(fault_log):
    for line in open(fault_log):
      kind, when = line.split()
      fired[kind] = float(when)
  return [(p.returncode, out, t) for p, out, t in zip(procs, outputs, ended)], fired


def _processes(workdir, tfds_dir, log_dir, faults, *extra, devices=4, timeout=900):
  """_start and _wait: one job, run to its end."""
  return _wait(_start(workdir, tfds_dir, log_dir, faults, *extra, devices=devices), timeout)


def _errors(output):
  return [l for l in output.splitlines() if l.startswith("error:")]


def _saved_step(output):
  lines = [l for l in output.splitlines() if "preemption (SIGTERM): saved step" in l]
  assert len(lines) == 1, output[-3000:]
  return int(lines[0].split("saved step ")[1].split()[0])


def test_sigterm_stops_two_processes_together_and_they_resume_on_another_topology(
    reference, tfds_dir, tmp_path):
  """SIGTERM to process 1 of two (FSDP over 8 devices) during an evaluation, then during a
  step: both save the same step, no earlier than the signal, and exit 0; the run resumes from
  it on one process with 4 devices, data parallel, restoring the parameters bit for bit and
  continuing like an uninterrupted run. Properties, not timings: under load the agreed step
  may come later (it is the first call no process had made when they agreed)."""
  ref_params, ref_losses, _ = reference
  workdir = str(tmp_path / "run")
  evaluate_every = ("--config.train.eval_every=5",)

  # 1. SIGTERM as the evaluation of step 5 starts (after the checkpoint of step 5).
  ran, fired = _processes(workdir, tfds_dir, tmp_path, ["", "sigterm_eval:5"], *FSDP,
                          *evaluate_every)
  first = {_saved_step(out) for _, out, _ in ran}
  for code, out, ended in ran:
    assert code == 0 and ended is not None, out[-3000:]
    assert "sigterm_eval" in fired
  assert len(first) == 1 and min(first) >= 5, first  # the same step on both
  first = first.pop()
  assert "process 1/2" in ran[1][1] and "mesh {'data': 1, 'fsdp': 8}" in ran[1][1]
  assert _steps(workdir)[-1] == first
  if first == 5:  # stopped inside the evaluation: it runs again first after the resume
    for _, out, _ in ran:
      assert "preemption (SIGTERM) during the evaluation of step 5" in out, out[-3000:]
    assert not os.path.exists(os.path.join(workdir, "eval", "metrics_5.json"))

  # 2. The rerun evaluates step 5 first if it was stopped, then trains until SIGTERM during a
  # later step's batch.
  signal_step = first + 3
  ran, fired = _processes(workdir, tfds_dir, tmp_path, ["", f"sigterm:{signal_step}"], *FSDP,
                          *evaluate_every)
  saved = {_saved_step(out) for _, out, _ in ran}
  for code, out, ended in ran:
    assert code == 0 and ended is not None, out[-3000:]
    assert f"starting at step {first} of 20" in out
  assert "sigterm" in fired
  assert len(saved) == 1 and signal_step <= min(saved) < NUM_STEPS, saved  # the same on both
  stopped = saved.pop()
  assert _steps(workdir)[-1] == stopped
  assert json.load(open(os.path.join(workdir, "eval", "metrics_5.json")))["step"] == 5

  # 3. The checkpoint of two FSDP processes restores onto 4 devices, data parallel, bit for bit.
  config = _config(tfds_dir)
  mesh = parallel.make_mesh(config, jax.devices()[:4])
  model = SemFlow.from_config(config, mesh)
  tx = state_lib.make_optimizer(config)
  target = state_lib.abstract(model, tx, config, mesh)
  manager = checkpoint.make_manager(workdir, 2)
  restored, data = checkpoint.restore_latest(manager, target, model.checkpoint_record())  # pyright: ignore[reportGeneralTypeIssues]
  stored = _stored_arrays(workdir, stopped)
  manager.close()
  assert data["position"] == stopped and int(restored.step) == stopped
  assert {x.sharding for x in jax.tree.leaves(restored)} == {NamedSharding(mesh, P())}
  assert jax.tree.structure(restored.params) == jax.tree.structure(stored["params"])
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(stored["params"])):
    np.testing.assert_array_equal(np.asarray(a), b)

  # 4. ... and the same resume by the command line, one process on 4 devices, continues to the
  # end with the losses of the uninterrupted one-process run.
  ran, _ = _processes(workdir, tfds_dir, tmp_path, [""])
  (code, out, _), = ran
  assert code == 0, out[-3000:]
  assert f"starting at step {stopped} of 20" in out and "mesh {'data': 4, 'fsdp': 1}" in out
  # Only process 0 of the two-process runs wrote TensorBoard events (one file per run).
  losses = _logged(workdir)
  assert sorted(losses) == sorted(ref_losses)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [ref_losses[s] for s in sorted(ref_losses)], rtol=1e-5)
  params, step = _params(config, workdir)
  assert step == NUM_STEPS
  flat, flat_ref = jax.tree.leaves(params), jax.tree.leaves(ref_params)
  diff = np.sqrt(sum(np.sum((np.asarray(a) - b) ** 2) for a, b in zip(flat, flat_ref)))
  assert diff / np.sqrt(sum(np.sum(np.square(b)) for b in flat_ref)) < 1e-5


def _stored_arrays(workdir, step):
  """The train state of checkpoint `step` as numpy, read without any mesh."""
  import orbax.checkpoint as ocp
  path = os.path.join(workdir, "checkpoints", str(step), "state")
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(path)
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def test_a_process_that_fails_ends_the_job_naming_it(tfds_dir, tmp_path):
  """Process 1 of two raises, or (another job, at the same time) is killed with SIGKILL, at
  step 3: process 0, blocked in that step's collective, exits non-zero with one line naming
  process 1, long before the deadline against hangs."""
  jobs = {}
  for fault in ("raise", "kill"):
    os.makedirs(tmp_path / fault)
    # A shorter peer timeout for the killed one: what is tested does not depend on its length.
    jobs[fault] = _start(str(tmp_path / fault / "run"), tfds_dir, str(tmp_path / fault),
                         ["", f"{fault}:3"], *FSDP, "--config.train.tensorboard=False",
                         env={"SEMFLOW_PEER_TIMEOUT_S": "20"} if fault == "kill" else None)
  for fault, job in jobs.items():
    ran, fired = _wait(job)
    (code0, out0, ended0), (code1, out1, _) = ran
    assert fault in fired and code0 not in (0, -signal.SIGKILL), (fault, code0, out0[-3000:])
    errors = _errors(out0)
    assert len(errors) == 1 and "process 1" in errors[0] and "stopping process 0" in errors[0], \
        out0[-3000:]
    assert "Traceback" not in out0 and "Check failed" not in out0
    if fault == "raise":
      assert code1 == 1 and "injected failure while reading the batch of step 3" in errors[0]
      assert "RuntimeError: injected failure" in out1  # its own traceback, then its line
    else:
      assert code1 == -signal.SIGKILL and "stopped responding" in errors[0]


def test_the_coordinator_exits_after_the_other_processes_of_a_failed_job(tfds_dir, tmp_path):
  """Both processes of an evaluation without a checkpoint fail, each with its own line and exit
  code. Process 0 hosts the coordination service: it exits only after process 1 has said it is
  leaving and had a moment to exit (once, in the suite under load, process 0 left as soon as
  process 1's word was stored, before the reply reached process 1, whose runtime then aborted
  with a native stack dump)."""
  ran, _ = _processes(str(tmp_path / "run"), tfds_dir, tmp_path, ["", ""], "--mode=eval",
                      devices=2, timeout=300)
  for code, out, _ in ran:
    errors = _errors(out)
    assert code == 2 and len(errors) == 1 and "no checkpoint in" in errors[0], out[-3000:]
    assert "Check failure" not in out and "Fatal Python error" not in out
  assert ran[0][2] > ran[1][2], (ran[0][2], ran[1][2])  # seen ending in a later poll


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
