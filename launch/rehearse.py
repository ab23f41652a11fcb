"""The pod run's dress rehearsal on this machine: every command of the chain, against a bucket.

  launch/rehearse.sh [--dir=/tmp/semflow_rehearsal] [--short]

A GCS server on localhost (tests/gcs_server.py, gcp-storage-emulator) is the bucket
gs://semflow-rehearsal; every command below is the one a user types on a TPU VM (README, "Cloud
TPU"), run as its own processes, with only the tiny model and sizes of `configs/folder.py:tiny`:

  folder     a folder dataset (classes.json, train/ and validation/ images and labels) uploaded
  convert    a random-weight SD-shaped diffusers folder converted into gs://.../sd15
  build      the folder built into gs://.../tfds by 2 processes (semflow_jax.data.build)
  encode     its training images' VAE moments encoded into the bucket by 2 processes
  train      4 processes x 2 fake CPU devices (jax.distributed on localhost, gloo collectives)
             from the cached latents, checkpoints and TensorBoard in gs://.../run; SIGTERM to
             process 1 once a few steps are logged: every process saves that step and exits 0
  resume     the same command on 2 processes x 2 devices (another device count), to the end and
             the final evaluation (validation split read from the bucket)
  reference  the same run uninterrupted, 1 process x 8 devices, into gs://.../reference
  compare    losses logged after the resume (TensorBoard events read back from the bucket) equal
             the reference's at the same steps (relative 1e-5: another device count sums in
             another order)
  segment    --mode=segment of the bucket's validation images folder into the bucket

It prints each stage's wall time and ends with the bucket's objects. Exit status 0 when every
command succeeded and the losses agree. `--short` trains 6 steps instead of 20 on 2 processes
(resumed on 1) instead of 4 (resumed on 2), and skips the reference run and the folder
segmentation's second pass (tests/test_rehearsal.py runs it).

How the clients reach the emulator: `epath` through fsspec/gcsfs (EPATH_USE_TF=false,
STORAGE_EMULATOR_HOST), so TensorBoard's events are written locally and uploaded through
semflow_jax.storage (metric_writer.for_run); Orbax's arrays through tensorstore
(TENSORSTORE_GCS_HTTP_URL); ArrayRecord's reader through google-cloud-cpp
(CLOUD_STORAGE_EMULATOR_ENDPOINT). On a TPU VM none of these variables is set.
"""

import argparse
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "semflow-rehearsal"
CLASSES = 5  # tests/dataset_fixtures.FOLDER_CLASSES


def _free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class Rehearsal:

  def __init__(self, root: str, short: bool):
    self.root, self.short = root, short
    self.times = []
    self.steps = 6 if short else 20
    # The short form (the test suite's) compiles in fewer processes: 2 x 2 devices, resumed on
    # 1 x 2 devices, still a SIGTERM agreed by several processes and another device count.
    self.train_processes, self.resume_processes = (2, 1) if short else (4, 2)
    self.logs = os.path.join(root, "logs")
    os.makedirs(self.logs, exist_ok=True)

  # -- plumbing --------------------------------------------------------------------------------
  def start_bucket(self):
    port = _free_port()
    self.server = subprocess.Popen(
        [sys.executable, "-m", "tests.gcs_server", f"--port={port}", f"--bucket={BUCKET}"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=open(os.path.join(self.logs, "gcs.log"), "w"),
        text=True)
    if self.server.stdout.readline().strip() != "ready":
      raise RuntimeError(f"the GCS server did not start: {self.logs}/gcs.log")
    url = f"http://127.0.0.1:{port}"
    self.env = {**os.environ, "PYTHONPATH": REPO, "EPATH_USE_TF": "false",
                "STORAGE_EMULATOR_HOST": url, "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,
                "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "rehearsal",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "JAX_PLATFORMS": "cpu",
                "TF_CPP_MIN_LOG_LEVEL": "2"}
    os.environ.update({k: v for k, v in self.env.items() if k != "PYTHONPATH"})

  def stop_bucket(self):
    self.server.terminate()
    self.server.wait(timeout=30)

  def stage(self, name, function):
    print(f"== {name}", flush=True)
    start = time.time()
    result = function()
    self.times.append((name, time.time() - start))
    print(f"== {name}: {self.times[-1][1]:.1f} s", flush=True)
    return result

  def run(self, name, cmd, devices=2):
    """One command, its output in logs/<name>.log; raises naming the log when it fails."""
    log = os.path.join(self.logs, f"{name}.log")
    env = {**self.env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    with open(log, "w") as out:
      code = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
      raise RuntimeError(f"`{' '.join(cmd)}` exited {code}; see {log}")
    with open(log) as f:
      return f.read()

  def job(self, name, processes, devices, extra=(), sigterm_after_step=None):
    """One training job of `processes` processes on localhost; SIGTERM to process 1 once
    process 0 has logged step `sigterm_after_step`. [(exit code, output)]."""
    address = f"127.0.0.1:{_free_port()}"
    env = {**self.env, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    procs, logs = [], []
    for i in range(processes):
      multi = ([f"--coordinator_address={address}", f"--num_processes={processes}",
                f"--process_id={i}"] if processes > 1 else [])
      logs.append(os.path.join(self.logs, f"{name}_{i}.log"))
      procs.append(subprocess.Popen(self.main_cmd(*extra, *multi), cwd=REPO, env=env,
                                    stdout=open(logs[-1], "w"), stderr=subprocess.STDOUT))
    signalled = sigterm_after_step is None
    deadline = time.time() + 1800
    while any(p.poll() is None for p in procs) and time.time() < deadline:
      if not signalled and f"step {sigterm_after_step}/" in open(logs[0]).read():
        procs[1].send_signal(signal.SIGTERM)
        print(f"   SIGTERM to process 1 after step {sigterm_after_step} was logged", flush=True)
        signalled = True
      time.sleep(0.2)
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    return [(p.returncode, open(log).read()) for p, log in zip(procs, logs)]

  def url(self, *parts):
    return "/".join([f"gs://{BUCKET}", *parts])

  def main_cmd(self, *extra, workdir="run"):
    return [sys.executable, "-m", "semflow_jax.main", "--config=configs/folder.py:tiny",
            f"--workdir={self.url(workdir)}", f"--config.data.folder={self.url('my_data')}",
            f"--config.data.num_classes={CLASSES}",
            f"--config.data.tfds_data_dir={self.url('tfds')}",
            f"--config.model.init_from={self.url('sd15')}",
            f"--config.train.num_steps={self.steps}", "--config.train.log_every=1",
            f"--config.train.checkpoint_every={2 if self.short else 5}",
            "--config.eval.num_examples=8", *extra]

  # -- the stages ------------------------------------------------------------------------------
  def folder(self):
    from tests import dataset_fixtures
    from semflow_jax import storage
    local = os.path.join(self.root, "my_data")
    dataset_fixtures.write_folder_dataset(local, splits=(("train", 24), ("validation", 8)))
    for path in glob.glob(os.path.join(local, "**", "*"), recursive=True):
      if os.path.isfile(path):
        with open(path, "rb") as f:
          storage.write_bytes(self.url("my_data", os.path.relpath(path, local)), f.read())

  def convert(self):
    from configs import sd15
    from tests import sd_fixtures
    local = os.path.join(self.root, "sd")
    sd_fixtures.save_pipeline(local, sd15.TINY_UNET, sd15.TINY_VAE, sd15.TINY_CONTEXT_TOKENS)
    self.run("convert", [sys.executable, "-m", "semflow_jax.convert",
                         f"--diffusers_dir={local}", f"--output={self.url('sd15')}"])

  def build(self):
    self.run("build", [sys.executable, "-m", "semflow_jax.data.build", "folder_dataset",
                       f"--manual_dir={self.url('my_data')}", f"--data_dir={self.url('tfds')}",
                       "--processes=2", "--examples_per_shard=8"])

  def encode(self):
    out = self.run("encode", [
        sys.executable, "-m", "semflow_jax.data.encode", "--config=configs/folder.py:tiny",
        f"--config.data.folder={self.url('my_data')}", f"--config.data.num_classes={CLASSES}",
        f"--config.data.tfds_data_dir={self.url('tfds')}",
        f"--config.model.init_from={self.url('sd15')}", "--processes=2",
        "--examples_per_shard=6"])
    flag = [l for l in out.splitlines() if "--config.data.image_latents=" in l]
    self.latents = flag[-1].split("--config.data.image_latents=")[1].strip()
    print(f"   {self.latents}")

  def train(self):
    ran = self.job("train", self.train_processes, 2,
                   (f"--config.data.image_latents={self.latents}",),
                   sigterm_after_step=3)
    saved = set()
    for i, (code, out) in enumerate(ran):
      lines = [l for l in out.splitlines() if "preemption (SIGTERM): saved step" in l]
      if code != 0 or len(lines) != 1:
        raise RuntimeError(f"train process {i} exited {code} without saving on SIGTERM; see "
                           f"{self.logs}/train_{i}.log")
      saved.add(int(lines[0].split("saved step ")[1].split()[0]))
    if len(saved) != 1:
      raise RuntimeError(f"the processes saved different steps {saved}")
    self.stopped = saved.pop()
    print(f"   all {self.train_processes} processes saved step {self.stopped} and exited 0")

  def resume(self):
    ran = self.job("resume", self.resume_processes, 2,
                   (f"--config.data.image_latents={self.latents}",))
    for i, (code, out) in enumerate(ran):
      if code != 0 or f"starting at step {self.stopped} of {self.steps}" not in out:
        raise RuntimeError(f"resume process {i} exited {code}; see {self.logs}/resume_{i}.log")
    print(f"   resumed at step {self.stopped} on {self.resume_processes} processes x 2 devices, "
          f"trained to {self.steps}, evaluated")

  def reference(self):
    ran = self.job("reference", 1, 8, (f"--config.data.image_latents={self.latents}",
                                       f"--workdir={self.url('reference')}"))
    if ran[0][0] != 0:
      raise RuntimeError(f"the reference run exited {ran[0][0]}; see {self.logs}/reference_0.log")

  def losses(self, workdir):
    """{step: train/loss} from the TensorBoard events in the bucket."""
    import tensorflow as tf
    from semflow_jax import storage
    values = {}
    with storage.local_copy(self.url(workdir)) as local:
      for path in glob.glob(os.path.join(local, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
          for v in event.summary.value:
            if v.tag == "train/loss":
              values[event.step] = float(tf.make_ndarray(v.tensor))
    return values

  def compare(self):
    run, reference = self.losses("run"), self.losses("reference")
    after = [s for s in sorted(run) if s > self.stopped]
    if not after or sorted(run) != list(range(1, self.steps + 1)) or \
        sorted(reference) != sorted(run):
      raise RuntimeError(f"logged steps: run {sorted(run)}, reference {sorted(reference)}")
    worst = max(abs(run[s] - reference[s]) / abs(reference[s]) for s in run)
    for s in after:
      print(f"   step {s:3d}  loss {run[s]:.7f}  reference {reference[s]:.7f}")
    print(f"   largest relative difference over all {len(run)} steps: {worst:.2e}")
    if worst > 1e-5:
      raise RuntimeError(f"the resumed run's losses differ from the reference's by {worst:.2e}")

  def evaluation(self):
    from semflow_jax import storage
    metrics = storage.read_json(self.url("run", "eval", f"metrics_{self.steps}.json"))
    print("   final evaluation: " + ", ".join(
        f"{k} {v:.4f}" for k, v in metrics.items() if k.startswith("miou") and v is not None))

  def segment(self):
    out = self.run("segment", self.main_cmd(
        "--mode=segment", f"--input={self.url('my_data', 'validation', 'images')}",
        f"--output={self.url('segmented')}"), devices=2)
    print("   " + [l for l in out.splitlines() if "images written" in l][-1].split("] ")[-1])

  def listing(self):
    """Every object, but only the first 3 of a directory holding more than 5."""
    from semflow_jax import storage
    files = storage.files_under(f"gs://{BUCKET}")
    print(f"== gs://{BUCKET}: {len(files)} objects")
    by_dir = {}
    for name, _ in files:
      by_dir.setdefault(os.path.dirname(name), []).append(name)
    for directory, names in by_dir.items():
      for n in names if len(names) <= 5 else names[:3]:
        print(f"   {n}")
      if len(names) > 5:
        print(f"   ... {len(names) - 3} more in {directory}/")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--dir", default=None, help="Working directory for local files and logs "
                      "(default: a new temporary one, removed at the end when all went well).")
  parser.add_argument("--short", action="store_true", help="6 steps, no reference run.")
  args = parser.parse_args()
  root = args.dir or tempfile.mkdtemp(prefix="semflow_rehearsal_")
  sys.path.insert(0, REPO)
  rehearsal = Rehearsal(root, args.short)
  start = time.time()
  rehearsal.start_bucket()
  ok = False
  try:
    stages = [("folder", rehearsal.folder), ("convert", rehearsal.convert),
              ("build", rehearsal.build), ("encode", rehearsal.encode),
              ("train", rehearsal.train), ("resume", rehearsal.resume)]
    if not args.short:
      stages.append(("reference", rehearsal.reference))
    stages += [("evaluation", rehearsal.evaluation)]
    if not args.short:
      stages.append(("compare", rehearsal.compare))
    stages.append(("segment", rehearsal.segment))
    for name, function in stages:
      rehearsal.stage(name, function)
    rehearsal.listing()
    ok = True
  except RuntimeError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
  finally:
    rehearsal.stop_bucket()
  print("== stage times (s): " + ", ".join(f"{n} {t:.1f}" for n, t in rehearsal.times)
        + f"; total {time.time() - start:.1f}")
  if ok and not args.dir:
    shutil.rmtree(root, ignore_errors=True)
  elif not ok:
    print(f"logs in {rehearsal.logs}", file=sys.stderr)
  sys.exit(0 if ok else 1)


if __name__ == "__main__":
  main()
