"""Cached image latents: encode the train split's VAE moments once, train from them.

The tiny SD config (random VAE and UNet from config.seed) on the synthetic scenes: the
moments a run reads give the loss the images give, a killed encode resumes to the same files,
latents of another VAE or image size are refused in one line, and the CLI trains from them.
"""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import sd15
from semflow_jax.data import encode, latents, pipeline
from semflow_jax.semflow import SemFlow
from tests.conftest import REPO

SHARD = 4  # examples per shard: 16 shards of the 64 training examples


def _config(tfds_dir, **overrides):
  config = sd15.get_config("tiny")
  config.data.tfds_data_dir = tfds_dir
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  return config


def _files(path):
  """{name: bytes} of every file in a latents directory (hidden progress files included)."""
  out = {}
  for root, _, names in os.walk(path):
    for name in names:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        out[os.path.relpath(full, path)] = f.read()
  return out


@pytest.fixture(scope="module")
def encoded(tmp_path_factory, tfds_dir):
  """The train split encoded in this process, uninterrupted: (config, directory)."""
  config = _config(tfds_dir)
  path = str(tmp_path_factory.mktemp("latents") / "tiny")
  assert encode.encode_latents(config, path, examples_per_shard=SHARD) == path
  return config, path


def _take(iterator, n):
  try:
    return [next(iterator) for _ in range(n)]
  finally:
    iterator.close()


def test_loss_on_cached_moments_equals_loss_on_images(encoded):
  """Same stream, same keys: the batches of a latent run carry the moments of exactly the
  images (mirrored or not) an image run encodes, so the loss is the same (the image run goes
  through SemFlow.encode_image, the model's own path)."""
  config, path = encoded
  model = SemFlow.from_config(config)
  params = jax.jit(model.init)(jax.random.split(jax.random.PRNGKey(config.seed))[0])
  cached = latents.open_latents(path)
  assert cached.metadata["shape"] == [2, *model.latent_shape[:2], 8]
  assert cached.metadata["vae"]["fingerprint"] == latents.fingerprint(params["vae"])
  images = _take(pipeline.TrainIterator(pipeline.get_builder(config.data), 16, seed=3), 3)
  moments = _take(pipeline.TrainIterator(pipeline.get_builder(config.data), 16, seed=3,
                                         latents=cached), 3)
  assert set(moments[0]) == {"label", "image_moments"}
  assert moments[0]["image_moments"].dtype == np.float32
  loss = jax.jit(model.loss)
  flipped = 0
  for step, (a, b) in enumerate(zip(images, moments)):
    np.testing.assert_array_equal(a["label"], b["label"])
    direct = np.asarray(jax.jit(model.image_moments)(params, a["image"]))
    np.testing.assert_allclose(b["image_moments"], direct, rtol=1e-5, atol=1e-6)
    rng = jax.random.PRNGKey(step)
    np.testing.assert_allclose(float(loss(params, b, rng)), float(loss(params, a, rng)),
                               rtol=1e-5)
    # Which examples were mirrored: their labels differ from the unflipped pipeline's.
    plain = _take(pipeline.TrainIterator(pipeline.get_builder(config.data), 16, seed=3,
                                         position=step, flip=False), 1)[0]
    flipped += int(np.sum(np.any(plain["label"] != a["label"], axis=(1, 2, 3))))
  assert 0 < flipped < 48  # both variants were read
  # The mirrored image's moments are not the moments mirrored: caching both is needed.
  record = np.frombuffer(cached.source[0], np.float32).reshape(cached.metadata["shape"])
  assert not np.allclose(record[1], record[0][:, ::-1], atol=1e-3)


def _encode_cmd(tfds_dir, output, *extra):
  return [sys.executable, "-m", "semflow_jax.data.encode", "--config=configs/sd15.py:tiny",
          f"--config.data.tfds_data_dir={tfds_dir}", f"--output={output}",
          f"--examples_per_shard={SHARD}", *extra]


def test_a_killed_encode_resumes_to_the_same_files(encoded, tfds_dir, tmp_path):
  """SIGKILL to the encode (its whole process group) once some shards are done: no latents.json,
  every visible shard whole; the same command with two processes writes only what is missing,
  and the files are those of the uninterrupted encode."""
  _, reference = encoded
  output = str(tmp_path / "latents")
  proc = subprocess.Popen(_encode_cmd(tfds_dir, output), cwd=REPO, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL, start_new_session=True)
  done_dir = os.path.join(output, ".encode", "done")
  deadline = time.time() + 400
  while proc.poll() is None and time.time() < deadline:
    if os.path.isdir(done_dir) and len(os.listdir(done_dir)) >= 2:
      os.killpg(proc.pid, signal.SIGKILL)
      break
    time.sleep(0.005)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the encode ended before it could be killed"
  assert not os.path.exists(os.path.join(output, latents.METADATA))
  visible = sorted(n for n in os.listdir(output) if n.endswith(".array_record"))
  done = sorted(n[:-len(".json")] for n in os.listdir(done_dir))
  assert 2 <= len(done) < 16 and set(done) <= set(visible), (done, visible)
  reference_files = _files(reference)
  for name in visible:  # a shard under its name is whole
    assert _files(output)[name] == reference_files[name], name
  with pytest.raises(latents.LatentsError, match="interrupted encode"):
    latents.open_latents(output)

  rerun = subprocess.run(_encode_cmd(tfds_dir, output, "--processes=2"), cwd=REPO,
                         capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"writing {16 - len(done)} of 16 shards" in rerun.stdout, rerun.stdout
  assert "encoding on 2 processes" in rerun.stdout
  assert f"--config.data.image_latents={output}" in rerun.stdout
  assert _files(output) == reference_files


def _one_error_line(cmd):
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 2, proc.stderr[-3000:]
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "train step compiled" not in proc.stderr  # refused before anything compiled
  return errors[0]


def test_latents_of_another_vae_or_image_size_are_refused_in_one_line(encoded, tfds_dir,
                                                                        tmp_path):
  config, path = encoded
  file = os.path.join(path, latents.METADATA)
  # Another VAE (config.seed draws the random one) through the command line: one line, exit 2,
  # before anything compiles.
  error = _one_error_line([
      sys.executable, "-m", "semflow_jax.main", "--config=configs/sd15.py:tiny",
      f"--workdir={tmp_path / 'run'}", f"--config.data.tfds_data_dir={tfds_dir}",
      f"--config.data.image_latents={path}", "--config.seed=1",
      "--config.train.tensorboard=False"])
  assert file in error and "another VAE" in error, error
  assert not [n for n in os.listdir(tmp_path / "run" / "checkpoints") if n.isdigit()]

  # Another image size: the check the run makes (train._image_latents), on another field.
  larger = SemFlow.from_config(_config(tfds_dir, **{"data.image_size": 32}))
  vae = jax.jit(larger.init_vae)(jax.random.split(jax.random.PRNGKey(config.seed))[0])
  expected = latents.describe(_config(tfds_dir, **{"data.image_size": 32}),
                              pipeline.get_builder(config.data), larger, latents.fingerprint(vae))
  with pytest.raises(latents.LatentsError) as raised:
    latents.open_latents(path).check(expected)
  message = str(raised.value)
  assert "\n" not in message and message.startswith(file), message
  assert "image_size is 16x16, this run's config.data.image_size is 32x32" in message

  # The encode refuses to resume or overwrite another VAE's latents in place.
  with pytest.raises(latents.LatentsError, match="another VAE"):
    other = config.copy_and_resolve_references()
    other.seed = 1
    encode.encode_latents(other, path, examples_per_shard=SHARD)


def test_training_from_cached_latents_end_to_end(encoded, tfds_dir, tmp_path):
  """The command a user types, on the tiny SD config: trains from the latents, evaluates."""
  _, path = encoded
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "semflow_jax.main", "--config=configs/sd15.py:tiny",
       f"--workdir={workdir}", f"--config.data.tfds_data_dir={tfds_dir}",
       f"--config.data.image_latents={path}", "--config.train.tensorboard=False"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"training from the image latents in {path}" in proc.stderr
  steps = sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())
  assert steps == [3, 6]
  metrics = json.loads((workdir / "eval" / "metrics_6.json").read_text())
  assert metrics["step"] == 6 and np.isfinite(metrics["miou_euler_1"])


def test_the_vae_fingerprint_ignores_the_layout_and_sees_every_value():
  """The same values replicated or split over 8 devices: one fingerprint; one value nudged by
  one ulp, or two values swapped: another."""
  rng = np.random.default_rng(0)
  tree = {"conv": {"kernel": rng.standard_normal((16, 3)).astype(np.float32)},
          "norm": {"scale": rng.standard_normal((8,)).astype(np.float32)}}
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("x",))
  split = jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("x")))
  assert split["conv"]["kernel"].sharding.shard_shape((16, 3)) == (2, 3)
  reference = latents.fingerprint(tree)
  assert latents.fingerprint(split) == reference
  nudged = jax.tree.map(np.copy, tree)
  nudged["conv"]["kernel"][5, 1] = np.nextafter(nudged["conv"]["kernel"][5, 1], np.float32(9))
  swapped = jax.tree.map(np.copy, tree)
  swapped["norm"]["scale"][[2, 6]] = swapped["norm"]["scale"][[6, 2]]
  assert len({reference, latents.fingerprint(nudged), latents.fingerprint(swapped)}) == 3
