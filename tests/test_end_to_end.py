"""Tiny runs of the whole loop on 8 fake CPU devices: train, checkpoint, resume, eval, sample."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from PIL import Image

from semflow_jax import evaluate, sample, state as state_lib, train
from semflow_jax.data import pipeline
from tests.conftest import REPO

REQUIRED_KEYS = {"step", "miou_euler_1", "miou_euler_25", "roundtrip_miou", "diversity",
                 "diversity_real", "colour_only_miou", "colour_only_miou_synth"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.data.tfds_data_dir = tfds_dir
  config.eval.seg_steps = (1, 25)  # the metric names the issue asks for
  config.eval.synth_steps = 3
  workdir = str(tmp_path_factory.mktemp("run"))
  result = train.train_and_evaluate(config, workdir)
  return config, workdir, result


def _checkpoint_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def test_training_writes_checkpoints_metrics_samples_and_tensorboard(trained):
  config, workdir, result = trained
  assert _checkpoint_steps(workdir) == [3, 6]  # every 3 steps, keep 2
  with open(os.path.join(workdir, "eval", "metrics_6.json")) as f:
    metrics = json.load(f)
  assert REQUIRED_KEYS <= set(metrics) and metrics["step"] == 6
  for k in REQUIRED_KEYS:
    assert metrics[k] == pytest.approx(result[k]), k
  for k in REQUIRED_KEYS - {"step"}:
    assert np.isfinite(metrics[k]), k
  assert 0 <= metrics["miou_euler_25"] <= 1 and metrics["diversity_real"] > 0
  assert metrics["num_examples"] == config.data.num_validation
  assert os.path.exists(os.path.join(workdir, "samples", "synthesis_6.png"))
  assert os.path.exists(os.path.join(workdir, "samples", "segmentation_6.png"))
  assert any(n.startswith("events.out.tfevents") for n in os.listdir(workdir))
  assert os.path.exists(os.path.join(workdir, "config.json"))


def test_eval_mode_reproduces_the_final_metrics(trained):
  config, workdir, result = trained
  again = evaluate.evaluate(config, workdir)
  for k in REQUIRED_KEYS:
    assert again[k] == pytest.approx(result[k], nan_ok=True), k


def test_interrupted_training_resumes_exactly(tiny_config, tmp_path, monkeypatch):
  tiny_config.train.eval_every = 0
  reference = str(tmp_path / "reference")
  train.train_and_evaluate(tiny_config, reference)

  interrupted = str(tmp_path / "interrupted")
  real_iterator = pipeline.TrainIterator

  class DyingIterator(real_iterator):
    def __next__(self):
      if self.position == 5:
        raise KeyboardInterrupt("simulated preemption after step 5")
      return super().__next__()

  monkeypatch.setattr(pipeline, "TrainIterator", DyingIterator)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tiny_config, interrupted)
  monkeypatch.setattr(pipeline, "TrainIterator", real_iterator)
  assert _checkpoint_steps(interrupted) == [3]
  with open(os.path.join(interrupted, "checkpoints", "3", "data", "metadata")) as f:
    assert json.load(f)["position"] == 3  # the data position is part of the checkpoint
  train.train_and_evaluate(tiny_config, interrupted)  # the same call resumes at step 3

  mesh_config = tiny_config
  from semflow_jax import parallel
  mesh = parallel.make_mesh(mesh_config)
  p_ref, s_ref = state_lib.load_params(tiny_config, reference, mesh)
  p_res, s_res = state_lib.load_params(tiny_config, interrupted, mesh)
  assert s_ref == s_res == 6
  for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_res)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_killed_process_resumes_from_its_last_checkpoint(tfds_dir, tmp_path):
  workdir = str(tmp_path / "killed")
  cmd = [sys.executable, "-m", "semflow_jax.main", "--config=configs/synthetic.py:tiny",
         f"--workdir={workdir}", f"--config.data.tfds_data_dir={tfds_dir}",
         "--config.train.num_steps=300", "--config.train.checkpoint_every=10",
         "--config.train.log_every=10"]
  env = {**os.environ, "XLA_FLAGS": ""}
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and not [s for s in _checkpoint_steps(workdir) if s >= 20]:
    time.sleep(0.2)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  saved = _checkpoint_steps(workdir)
  assert saved and saved[-1] < 300, saved
  rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert rerun.returncode == 0, rerun.stderr[-3000:]
  assert f"starting at step {saved[-1]} of 300" in rerun.stderr
  assert os.path.exists(os.path.join(workdir, "eval", "metrics_300.json"))


def test_segmentation_is_deterministic_and_returns_the_input_size(trained, tmp_path):
  config, workdir, _ = trained
  rng = np.random.default_rng(0)
  photo = str(tmp_path / "photo.png")
  Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(photo)
  first = sample.segment_file(config, workdir, photo, str(tmp_path / "a" / "mask.png"))
  second = sample.segment_file(config, workdir, photo, str(tmp_path / "b" / "mask.png"))
  np.testing.assert_array_equal(first, second)
  written = np.asarray(Image.open(tmp_path / "a" / "mask.png"))
  assert written.shape == (24, 20) and written.dtype == np.uint8
  np.testing.assert_array_equal(written, first)
  assert written.max() < config.data.num_classes
  preview = np.asarray(Image.open(tmp_path / "a" / "mask_preview.png"))
  assert preview.shape == (24, 20, 3)
  with open(tmp_path / "a" / "mask.png", "rb") as f1, open(tmp_path / "b" / "mask.png", "rb") as f2:
    assert f1.read() == f2.read()


def test_synthesis_writes_n_distinct_images_at_the_mask_size(trained, tmp_path):
  config, workdir, _ = trained
  labels = np.zeros((20, 28), np.uint8)
  labels[10:] = 1
  labels[2:6, 3:9] = 2
  mask = str(tmp_path / "mask.png")
  Image.fromarray(labels).save(mask)
  paths = sample.synthesize_file(config, workdir, mask, str(tmp_path / "out"), 3)
  assert [os.path.basename(p) for p in paths] == ["sample_0.png", "sample_1.png", "sample_2.png"]
  outs = [np.asarray(Image.open(p)) for p in paths]
  assert all(o.shape == (20, 28, 3) for o in outs)
  assert not np.array_equal(outs[0], outs[1])  # different perturbation noise per sample
