"""Runs that live in a bucket: the real command line against a GCS server on localhost.

A gcp-storage-emulator (tests/gcs_server.py) serves one bucket on 127.0.0.1. Every command runs
as users run it, with `--workdir=gs://...`: train, killed after a checkpoint and resumed;
--mode=eval, segment and synthesize with inputs and outputs in the bucket; the converter writing
to the bucket and a run initialised from there. The bucket is read back over the emulator's
JSON API (not through semflow_jax), and no `gs:` directory may appear on the local disk.

How the clients reach the emulator: epath through fsspec/gcsfs (`EPATH_USE_TF=false`,
`STORAGE_EMULATOR_HOST`); Orbax's array data through tensorstore (`TENSORSTORE_GCS_HTTP_URL`,
`GOOGLE_AUTH_TOKEN_FOR_TESTING`). TensorFlow's own GCS client has no emulator endpoint, so its two
uses stay local here: TensorBoard is off (`config.train.tensorboard=False`) and the tfds data
directory is local (README, "Cloud TPU", says how those are covered).
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from configs import sd15
from tests import sd_fixtures as fx
from tests.conftest import REPO, free_port

BUCKET = "semflow-test"


class Bucket:
  """The emulator's bucket, read and written over plain HTTP (the GCS JSON API)."""

  def __init__(self, url, read_log=None):
    self.url, self.read_log = url, read_log

  def downloads(self, prefix=""):
    """{object name: times the server sent its content} under `prefix`, since the start."""
    counts = {}
    with open(self.read_log) as f:
      for name in f.read().split():
        if name.startswith(prefix):
          counts[name] = counts.get(name, 0) + 1
    return counts

  def _get(self, path):
    with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as r:
      return r.read()

  def names(self, prefix=""):
    query = urllib.parse.urlencode({"prefix": prefix})
    listing = json.loads(self._get(f"/storage/v1/b/{BUCKET}/o?{query}"))
    return sorted(o["name"] for o in listing.get("items", []))

  def read(self, name):
    return self._get(f"/download/storage/v1/b/{BUCKET}/o/{urllib.parse.quote(name, safe='')}"
                     "?alt=media")

  def write(self, name, data: bytes):
    query = urllib.parse.urlencode({"uploadType": "media", "name": name})
    request = urllib.request.Request(f"{self.url}/upload/storage/v1/b/{BUCKET}/o?{query}",
                                     data=data, method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
    urllib.request.urlopen(request, timeout=30).read()

  def bucket_exists(self, name):
    try:
      self._get(f"/storage/v1/b/{name}")
      return True
    except urllib.error.HTTPError as e:
      if e.code == 404:
        return False
      raise

  def png(self, name):
    return np.asarray(Image.open(io.BytesIO(self.read(name))))


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  port = free_port()
  server_dir = tmp_path_factory.mktemp("gcs")
  log = open(server_dir / "server.log", "w+")
  read_log = str(server_dir / "reads.log")
  server = subprocess.Popen([sys.executable, "-m", "tests.gcs_server", f"--port={port}",
                             f"--bucket={BUCKET}", f"--read_log={read_log}"], cwd=REPO,
                            stdout=subprocess.PIPE,
                            stderr=log, text=True)
  try:
    assert server.stdout.readline().strip() == "ready", open(log.name).read()[-2000:]
    url = f"http://127.0.0.1:{port}"
    cwd = str(tmp_path_factory.mktemp("cwd"))  # the commands' working directory
    # The suite's 8 CPU devices and compilation cache: these runs compile the same programs as
    # test_resilience.py and test_sd_end_to_end.py, so the cache serves both.
    env = {**os.environ,
           "PYTHONPATH": REPO,
           "EPATH_USE_TF": "false",
           "STORAGE_EMULATOR_HOST": url,
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",  # else a 60 s gRPC time-out per bucket
           "TENSORSTORE_GCS_HTTP_URL": url,
           "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test"}
    yield Bucket(url, read_log), env, cwd
    for d in (cwd, REPO):  # an os.path.abspath("gs://...") would have made <cwd>/gs:/...
      assert not os.path.exists(os.path.join(d, "gs:")), f"a bucket path fell back to {d}/gs:"
  finally:
    server.terminate()
    server.wait(timeout=30)
    log.close()


def _main(*args, config="configs/synthetic.py:tiny"):
  return [sys.executable, "-m", "semflow_jax.main", f"--config={os.path.join(REPO, config)}",
          "--config.train.tensorboard=False", *args]


def _run(cmd, env, cwd, timeout=600):
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return proc.stderr


def _complete_steps(bucket, prefix):
  """Checkpoint steps Orbax has committed (on GCS: a commit_success.txt, no rename)."""
  return sorted(int(n.split("/")[-2]) for n in bucket.names(prefix)
                if n.endswith("/commit_success.txt") and n.split("/")[-2].isdigit())


@pytest.fixture(scope="module")
def trained(gcs, tfds_dir):
  """A tiny run in gs://bucket/run, killed (SIGKILL) after its first checkpoint, then resumed.

  A checkpoint every step, so the kill may land in the middle of a save (on GCS Orbax writes
  the step in place and marks it complete with commit_success.txt last); the bucket is looked
  at once the process is gone."""
  bucket, env, cwd = gcs
  common = ["--workdir=gs://semflow-test/run", f"--config.data.tfds_data_dir={tfds_dir}",
            "--config.train.num_steps=20", "--config.train.log_every=1"]
  proc = subprocess.Popen(_main(*common, "--config.train.checkpoint_every=1"), cwd=cwd, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    deadline = time.time() + 500
    while proc.poll() is None and time.time() < deadline and not _complete_steps(bucket, "run/"):
      time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed"
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  committed = _complete_steps(bucket, "run/")
  assert committed and committed[-1] < 20, committed
  killed_at = committed[-1]
  log = _run(_main(*common, "--config.train.checkpoint_every=5"), env, cwd)
  return bucket, env, cwd, common, killed_at, 20, log


def test_training_in_a_bucket_resumes_after_kill_9_and_writes_everything_there(trained):
  bucket, _, _, _, killed_at, final, log = trained
  assert f"starting at step {killed_at} of {final}" in log
  names = bucket.names("run/")
  assert final in _complete_steps(bucket, "run/")
  metrics = json.loads(bucket.read(f"run/eval/metrics_{final}.json"))
  assert metrics["step"] == final and 0 <= metrics["miou_euler_2"] <= 1
  config = json.loads(bucket.read("run/config.json"))
  assert config["train"]["num_steps"] == final and config["train"]["tensorboard"] is False
  for grid in ("segmentation", "synthesis"):
    image = bucket.png(f"run/samples/{grid}_{final}.png")
    assert image.ndim == 3 and image.shape[2] == 3
  assert not [n for n in names if "events.out.tfevents" in n]  # tensorboard=False
  assert not [n for n in names if ".tmp-" in n]  # atomic writes left no temporary objects


def test_eval_segment_and_synthesize_read_and_write_the_bucket(trained, tmp_path):
  bucket, env, cwd, common, _, final, _ = trained
  _run(_main(*common, "--mode=eval"), env, cwd)
  again = json.loads(bucket.read(f"run/eval/metrics_{final}.json"))
  assert again["step"] == final

  rng = np.random.default_rng(0)
  photo, mask = io.BytesIO(), io.BytesIO()
  Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(photo, format="PNG")
  labels = np.zeros((20, 28), np.uint8)
  labels[10:], labels[2:6, 3:9] = 1, 2
  Image.fromarray(labels).save(mask, format="PNG")
  bucket.write("inputs/photo.png", photo.getvalue())
  bucket.write("inputs/mask.png", mask.getvalue())

  workdir = "--workdir=gs://semflow-test/run"
  _run(_main(workdir, "--mode=segment", "--input=gs://semflow-test/inputs/photo.png",
             "--output=gs://semflow-test/outputs/labels.png"), env, cwd)
  segmented = bucket.png("outputs/labels.png")
  assert segmented.shape == (24, 20) and segmented.max() < 7
  preview = bucket.png("outputs/labels_preview.png")  # enlarged 8x, a legend on the right
  assert preview.shape[0] == 24 * 8 and preview.shape[1] > 20 * 8 and preview.shape[2] == 3

  _run(_main(workdir, "--mode=synthesize", "--input=gs://semflow-test/inputs/mask.png",
             "--output=gs://semflow-test/outputs/samples", "--num_samples=2"), env, cwd)
  assert bucket.names("outputs/samples/") == ["outputs/samples/sample_0.png",
                                               "outputs/samples/sample_1.png"]
  samples = [bucket.png(f"outputs/samples/sample_{i}.png") for i in range(2)]
  assert all(s.shape == (20, 28, 3) for s in samples)
  assert not np.array_equal(samples[0], samples[1])

  # A folder in the bucket, into the bucket; the second run finds every output there.
  for i, (h, w) in enumerate(((16, 16), (20, 28), (12, 9))):
    data = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(data, format="PNG")
    bucket.write(f"inputs/photos/sub/p{i}.png" if i == 2 else f"inputs/photos/p{i}.png",
                 data.getvalue())
  folder = (workdir, "--mode=segment", "--input=gs://semflow-test/inputs/photos",
            "--output=gs://semflow-test/outputs/folder")
  log = _run(_main(*folder), env, cwd)
  assert "segment: 3 of 3 images written" in log
  assert bucket.names("outputs/folder/") == [
      "outputs/folder/labels/p0.png", "outputs/folder/labels/p1.png",
      "outputs/folder/labels/sub/p2.png"]
  assert bucket.png("outputs/folder/labels/p1.png").shape == (20, 28)
  again = _run(_main(*folder), env, cwd)
  assert "the outputs of all 3 inputs already exist in gs://" in again, again[-3000:]
  assert "nothing left to do" in again and " nan " not in again


def test_convert_into_the_bucket_and_train_from_it(gcs, tfds_dir, tmp_path):
  """The converter reads a diffusers clone in the bucket that holds several weight variants per
  folder, fetching only the files it converts, once each; --overwrite that fails keeps the
  previous conversion in use; a run initialises from the bucket."""
  bucket, env, cwd = gcs
  root = str(tmp_path / "sd")
  fx.save_pipeline(root, sd15.TINY_UNET, sd15.TINY_VAE, sd15.TINY_CONTEXT_TOKENS)
  # The variants a diffusers clone of SD-1.5 holds beside the weights the converter reads.
  variants = {"unet/diffusion_pytorch_model.fp16.safetensors": "unet/diffusion_pytorch_model.safetensors",
              "unet/diffusion_pytorch_model.non_ema.bin": "unet/diffusion_pytorch_model.safetensors",
              "vae/diffusion_pytorch_model.fp16.safetensors": "vae/diffusion_pytorch_model.safetensors",
              "text_encoder/model.fp16.safetensors": "text_encoder/model.safetensors",
              "safety_checker/model.safetensors": "vae/diffusion_pytorch_model.safetensors"}
  uploaded = []
  for dirpath, _, files in os.walk(root):  # the diffusers folder is read from the bucket too
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        uploaded.append("sd/" + os.path.relpath(path, root))
        bucket.write(uploaded[-1], f.read())
  for name, like in variants.items():
    with open(os.path.join(root, like), "rb") as f:
      bucket.write("sd/" + name, f.read())
  assert "sd/text_encoder/model.safetensors" in uploaded

  convert_cmd = [sys.executable, "-m", "semflow_jax.convert", "--diffusers_dir=gs://semflow-test/sd",
                 "--output=gs://semflow-test/sd15_flax"]
  _run(convert_cmd, env, cwd)
  read = bucket.downloads("sd/")
  weights = {"sd/unet/diffusion_pytorch_model.safetensors", "sd/vae/diffusion_pytorch_model.safetensors",
             "sd/text_encoder/model.safetensors"}
  assert weights <= set(read) and not set(read) & {f"sd/{n}" for n in variants}, read
  assert all(read[n] == 1 for n in weights), read  # each weights file fetched once
  assert set(read) <= set(uploaded), read  # nothing beyond what it converts
  marker = json.loads(bucket.read("sd15_flax/conversion.json"))
  assert marker["items"] == ["context", "unet", "vae"]
  version = f"sd15_flax/{marker['version']}/"
  converted = bucket.names("sd15_flax/")
  assert {version + "unet_config.json", version + "vae_config.json"} <= set(converted)
  assert any(n.startswith(version + "params/") for n in converted)
  assert {n.split("/")[1] for n in converted} == {"conversion.json", marker["version"]}

  # --overwrite from a folder that fails half-way (the VAE's weights are damaged) leaves the
  # previous conversion complete and in use.
  bucket.write("sd/vae/diffusion_pytorch_model.safetensors", b"not safetensors")
  proc = subprocess.run(convert_cmd + ["--overwrite"], cwd=cwd, env=env, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2 and "sd/vae" in proc.stderr, proc.stderr[-3000:]
  assert bucket.names("sd15_flax/") == converted
  assert json.loads(bucket.read("sd15_flax/conversion.json")) == marker

  log = _run(_main("--workdir=gs://semflow-test/sd_run", f"--config.data.tfds_data_dir={tfds_dir}",
                   "--config.model.init_from=gs://semflow-test/sd15_flax",
                   config="configs/sd15.py:tiny"), env, cwd)
  assert "initialised context, unet, vae from gs://semflow-test/sd15_flax" in log
  assert _complete_steps(bucket, "sd_run/") == [3, 6]


def test_a_folder_dataset_in_the_bucket_builds(gcs, tmp_path):
  """classes.json, images/ and labels/ read from gs:// (the tfds directory stays local: TF's
  own GCS client has no emulator endpoint)."""
  import tensorflow_datasets as tfds
  from tests import dataset_fixtures as dfx
  bucket, env, cwd = gcs
  written = dfx.write_folder_dataset(str(tmp_path / "d"), splits=(("", 6),))[""]
  for dirpath, _, files in os.walk(tmp_path / "d"):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        bucket.write("my_data/" + os.path.relpath(path, tmp_path / "d"), f.read())
  _run([sys.executable, "-m", "semflow_jax.data.build", "folder_dataset",
        "--manual_dir=gs://semflow-test/my_data", "--validation_fraction=0.34",
        f"--data_dir={tmp_path / 'tfds'}"], env, cwd)
  (built,) = [d for d, _, files in os.walk(tmp_path / "tfds") if "dataset_info.json" in files]
  builder = tfds.builder_from_directory(built)
  assert builder.info.splits["train"].num_examples == 4
  stored = {**dfx.examples(builder, "train"), **dfx.examples(builder, "validation")}
  assert sorted(stored) == [name for name, *_ in written]
  for name, _, _, label in written:
    np.testing.assert_array_equal(stored[name]["label"][..., 0], label)


def _one_error_line(cmd, env, cwd):
  proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "train step compiled" not in proc.stderr  # stopped before any training
  return errors[0]


def test_a_bucket_that_cannot_be_used_stops_in_one_line_before_training(gcs):
  bucket, env, cwd = gcs
  error = _one_error_line(_main("--workdir=gs://no-such-bucket/run"), env, cwd)
  assert "--workdir=gs://no-such-bucket/run" in error and "does not exist" in error, error
  assert not bucket.bucket_exists("no-such-bucket")  # not created on the way

  unreachable = {**env, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{free_port()}",
                 "SEMFLOW_STORAGE_TIMEOUT_S": "5"}
  error = _one_error_line(_main("--workdir=gs://semflow-test/run2"), unreachable, cwd)
  assert "--workdir=gs://semflow-test/run2" in error and "unreachable" in error, error

  # Outside an emulator gs:// needs Google credentials; these point at a file that is not there.
  no_credentials = {k: v for k, v in env.items() if k != "STORAGE_EMULATOR_HOST"}
  no_credentials.update(GOOGLE_APPLICATION_CREDENTIALS=os.path.join(cwd, "missing.json"),
                        NO_GCE_CHECK="True")
  error = _one_error_line(_main("--workdir=gs://semflow-test/run3"), no_credentials, cwd)
  assert "--workdir=gs://semflow-test/run3" in error and "credentials" in error, error
  assert not bucket.names("run2/") and not bucket.names("run3/")


_STORAGE_CALLS = """
import json, os, sys
from semflow_jax import storage
base = sys.argv[1]
storage.write_json(storage.join(base, "a", "m.json"), {"x": 1})
storage.write_bytes(storage.join(base, "a", "b", "c.bin"), b"abc")
staging = storage.staging_dir(storage.join(base, "moved"))
storage.write_text(storage.join(staging, "sub", "t.txt"), "hello")
storage.move_tree(staging, storage.join(base, "moved"))
with storage.local_copy(storage.join(base, "moved")) as local:
  copied = open(os.path.join(local, "sub", "t.txt")).read()
storage.remove_tree(storage.join(base, "a", "b"))
print(json.dumps({
    "json": storage.read_json(storage.join(base, "a", "m.json")),
    "listdir": storage.listdir(storage.join(base, "a")),
    "is_dir": storage.is_dir(storage.join(base, "moved", "sub")),
    "staging_left": storage.exists(staging),
    "copied": copied,
    "makedirs_noop": storage.makedirs("gs://no-bucket-made-here/x") is None,
}))
"""


def test_storage_layer_against_the_bucket(gcs):
  """The storage functions the commands rely on, on a bucket path (copy-then-delete moves)."""
  bucket, env, cwd = gcs
  out = subprocess.run([sys.executable, "-c", _STORAGE_CALLS, "gs://semflow-test/layer"],
                       cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result == {"json": {"x": 1}, "listdir": ["m.json"], "is_dir": True,
                    "staging_left": False, "copied": "hello", "makedirs_noop": True}
  assert bucket.names("layer/") == ["layer/a/m.json", "layer/moved/sub/t.txt"]
  assert not bucket.bucket_exists("no-bucket-made-here")
