"""Tiny runs of the whole loop on 8 fake CPU devices: train, checkpoint, eval, sample.

Resume after SIGTERM and kill -9 is tested in test_resilience.py."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from semflow_jax import checkpoint, evaluate, image_files, images, sample, train
from tests.conftest import REPO, free_port, run_together

REQUIRED_KEYS = {"step", "miou_euler_1", "miou_euler_25", "roundtrip_miou", "diversity",
                 "diversity_real", "colour_only_miou", "colour_only_miou_synth"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tfds_dir):
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.data.tfds_data_dir = tfds_dir
  config.eval.seg_steps = (1, 25)  # the metric names the issue asks for
  config.eval.synth_steps = 3
  config.train.profile_steps = (2, 3)
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


def test_profile_steps_write_a_trace_to_the_workdir(trained):
  _, workdir, _ = trained
  traces = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(workdir, "profile"))
            for n in names]
  assert any(t.endswith(".xplane.pb") for t in traces), traces  # TensorBoard / XProf
  assert any(t.endswith("perfetto_trace.json.gz") for t in traces), traces  # ui.perfetto.dev
  assert all(os.path.getsize(t) > 0 for t in traces)


def test_profile_steps_must_be_an_ordered_pair(tiny_config, tmp_path):
  tiny_config.train.profile_steps = (5, 2)
  with pytest.raises(ValueError, match=r"config.train.profile_steps=\(5, 2\)"):
    train.train_and_evaluate(tiny_config, str(tmp_path))
  assert not os.listdir(tmp_path)  # refused before anything is written


def test_eval_mode_reproduces_the_final_metrics(trained):
  config, workdir, result = trained
  again = evaluate.evaluate(config, workdir)
  for k in REQUIRED_KEYS:
    assert again[k] == pytest.approx(result[k], nan_ok=True), k


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
  # The preview: the colourised map enlarged 8x (to >= 160 pixels) beside a legend.
  preview = np.asarray(Image.open(tmp_path / "a" / "mask_preview.png"))
  assert preview.shape[0] == 24 * 8 and preview.shape[1] > 20 * 8
  np.testing.assert_array_equal(preview[:24 * 8:8, :20 * 8:8], images.colourise(first))
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


def test_edit_style_and_resample_files_keep_what_they_promise(trained, tmp_path):
  """The file CLI of issue #14 at the model's size (so no resizing): a blended edit leaves
  every unedited pixel of the photo as it was; style strength 1 and re-sampling an empty
  region both write the plain samples, byte for byte."""
  config, workdir, _ = trained
  size = config.data.image_size
  rng = np.random.default_rng(1)
  photo = str(tmp_path / "photo.png")
  pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
  Image.fromarray(pixels).save(photo)
  labels = sample.segment_file(config, workdir, photo, str(tmp_path / "seg.png"))
  edited = labels.copy()
  edited[4:10, 3:12] = (labels[4:10, 3:12] + 1) % config.data.num_classes
  Image.fromarray(edited).save(tmp_path / "edited.png")
  out = sample.edit_file(config, workdir, photo, str(tmp_path / "edited.png"),
                         str(tmp_path / "edited_out.png"), "blend")
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "edited_out.png")), out)
  unchanged = edited == labels
  np.testing.assert_array_equal(out[unchanged], pixels[unchanged])
  assert not np.array_equal(out[~unchanged], pixels[~unchanged])

  mask = str(tmp_path / "seg.png")
  plain = sample.synthesize_file(config, workdir, mask, str(tmp_path / "plain"), 2)
  empty = str(tmp_path / "empty_region.png")
  Image.fromarray(np.zeros((size, size), np.uint8)).save(empty)
  for name, kwargs in (("styled", dict(style=photo, style_strength=1.0)),
                       ("resampled", dict(resample_mask=empty))):
    paths = sample.synthesize_file(config, workdir, mask, str(tmp_path / name), 2, **kwargs)
    for a, b in zip(plain, paths):
      with open(a, "rb") as fa, open(b, "rb") as fb:
        assert fa.read() == fb.read(), name


def test_an_ensemble_of_a_run_and_its_copy_segments_like_the_run(trained, tmp_path):
  import shutil
  config, workdir, _ = trained
  copy = str(tmp_path / "copy")
  shutil.copytree(workdir, copy)
  photo = str(tmp_path / "photo.png")
  size = config.data.image_size
  Image.fromarray(np.random.default_rng(2).integers(0, 255, (size, size, 3), dtype=np.uint8)
                  ).save(photo)
  alone = sample.segment_file(config, workdir, photo, str(tmp_path / "a.png"))
  pair = sample.segment_file(config, workdir, photo, str(tmp_path / "b.png"), ensemble=[copy])
  np.testing.assert_array_equal(alone, pair)  # (v + v) / 2 == v exactly
  # One run named twice is one member: `run/` and `run` are the same directory.
  same = sample.Predictor.load(config, workdir, ensemble=[workdir + "/", workdir + "/."])
  assert isinstance(same.params["unet"], dict)
  two = sample.Predictor.load(config, workdir, ensemble=[copy + "/"])
  assert isinstance(two.params["unet"], tuple) and len(two.params["unet"]) == 2


def test_a_checkpoint_of_one_palette_is_refused_by_a_config_of_the_other(trained, tmp_path):
  config, workdir, _ = trained
  assert config.model.palette == "spread"
  other = config.copy_and_resolve_references()
  other.model.palette = "paper"
  before = sorted(os.listdir(os.path.join(workdir, "checkpoints")))
  message = (r"checkpoint .*/checkpoints/6 was trained with palette 'spread' \(7 anchors\), but "
             r"this config has config.model.palette='paper' \(7 anchors\)")
  for run in (lambda: train.train_and_evaluate(other, workdir),
              lambda: evaluate.evaluate(other, workdir),
              lambda: sample.segment_file(other, workdir, _png(tmp_path), str(tmp_path / "o.png"))):
    with pytest.raises(checkpoint.IncompatibleCheckpointError, match=message):
      run()
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == before
  assert not os.path.exists(tmp_path / "o.png")


def _png(tmp_path):
  path = str(tmp_path / "in.png")
  Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(path)
  return path


def test_two_processes_segment_a_folder_each_its_own_files(trained, tmp_path):
  """The CLI on a folder, as a two-host job runs it (2 processes x 2 devices on localhost):
  each process reads and writes its own share of the files, every output is what one process
  computes for that image alone."""
  config, workdir, _ = trained
  rng = np.random.default_rng(4)
  os.makedirs(tmp_path / "photos")
  sizes = ((16, 16), (20, 28), (12, 9), (16, 40), (30, 18))
  for i, (h, w) in enumerate(sizes):  # 5 files: 3 for process 0, 2 for process 1
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        tmp_path / "photos" / f"p{i}.png")
  address = f"127.0.0.1:{free_port()}"
  command = [sys.executable, "-m", "semflow_jax.main", "--config=configs/synthetic.py:tiny",
             f"--workdir={workdir}", "--mode=segment", f"--input={tmp_path / 'photos'}",
             f"--output={tmp_path / 'out'}", f"--coordinator_address={address}",
             "--num_processes=2"]
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  ran = run_together([command + [f"--process_id={i}"] for i in range(2)], [env] * 2, tmp_path,
                     timeout=300)
  for (proc, output), mine in zip(ran, (3, 2)):
    assert proc.returncode == 0, output[-3000:]
    assert f"segment: {mine} of {mine} images written" in output  # each its own progress line
  predictor = sample.Predictor.load(config, workdir)
  for i in range(len(sizes)):
    photo = image_files.read_image(str(tmp_path / "photos" / f"p{i}.png"))
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "out" / "labels" / f"p{i}.png")), predictor.segment(photo))


# The README's file commands ("Segment and synthesise", "Editing photos, ..."), after
# `python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic`.
README_FILE_COMMANDS = [
    "--mode=segment --input=photo.png --output=mask.png",
    "--mode=synthesize --input=mask.png --num_samples=4 --output=samples/",
    "--mode=edit --input=photo.png --labels=edited_mask.png --output=edited.png",
    "--mode=synthesize --input=mask.png --style=reference.png --style_strength=0.7 "
    "--colour_transfer --output=styled/",
    "--mode=synthesize --input=mask.png --resample_classes=3,5 --output=resampled/",
    "--mode=segment --input=photo.png --output=mask.png --ensemble=runs/synthetic_seed1",
    "--mode=segment --input=photos/ --output=predictions/",  # "Predict a whole folder"
    "--mode=synthesize --input=predictions/labels/ --num_samples=2 --output=syntheses/",
]


def test_the_readmes_file_commands_run_as_written(trained, tmp_path):
  """Each command as the README writes it, in a folder holding the user's files, shortened only
  by the tiny config (the trained run's) and its data directory."""
  import re
  import shutil
  config, workdir, _ = trained
  with open(os.path.join(REPO, "README.md")) as f:
    readme = re.sub(r"\\\n\s*", "", f.read())  # continuation lines joined
  head = ("python -m semflow_jax.main --config=configs/synthetic.py --workdir=runs/synthetic ")
  for args in README_FILE_COMMANDS:
    assert head + args in readme, args
  size = config.data.image_size
  rng = np.random.default_rng(5)
  for name in ("photo.png", "reference.png"):
    Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(
        tmp_path / name)
  os.makedirs(tmp_path / "photos" / "sub")
  for name in ("a.png", "sub/b.png"):
    shutil.copy(tmp_path / "photo.png", tmp_path / "photos" / name)
  os.makedirs(tmp_path / "runs")
  os.symlink(workdir, tmp_path / "runs" / "synthetic")
  shutil.copytree(workdir, tmp_path / "runs" / "synthetic_seed1")
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": REPO}
  for i, args in enumerate(README_FILE_COMMANDS):
    if i == 2:  # the user changes some labels of the segmentation
      labels = np.asarray(Image.open(tmp_path / "mask.png"))
      edited = labels.copy()
      edited[:size // 2] = (labels[:size // 2] + 1) % config.data.num_classes
      Image.fromarray(edited).save(tmp_path / "edited_mask.png")
    if i == 5:
      first = np.asarray(Image.open(tmp_path / "mask.png"))
    proc = subprocess.run(
        [sys.executable, "-m", "semflow_jax.main",
         f"--config={REPO}/configs/synthetic.py:tiny", "--workdir=runs/synthetic",
         f"--config.data.tfds_data_dir={config.data.tfds_data_dir}", *args.split()],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (args, proc.stderr[-3000:])
  photo = np.asarray(Image.open(tmp_path / "photo.png"))
  mask = np.asarray(Image.open(tmp_path / "mask.png"))
  assert mask.shape == photo.shape[:2] and mask.max() < config.data.num_classes
  assert (tmp_path / "mask_preview.png").exists()
  np.testing.assert_array_equal(mask, first)  # a run and its copy: the run's velocity exactly
  for folder, count in (("samples", 4), ("styled", 4), ("resampled", 4)):
    written = sorted(os.listdir(tmp_path / folder))
    assert written == [f"sample_{i}.png" for i in range(count)], (folder, written)
    assert np.asarray(Image.open(tmp_path / folder / written[0])).shape == photo.shape
  assert np.asarray(Image.open(tmp_path / "edited.png")).shape == photo.shape
  for name in ("a", "sub/b"):  # the folder: the photo's labels under each name, two samples each
    np.testing.assert_array_equal(
        np.asarray(Image.open(tmp_path / "predictions" / "labels" / f"{name}.png")), mask)
    for i in range(2):
      assert np.asarray(Image.open(tmp_path / "syntheses" / f"{name}_{i}.png")).shape == \
          photo.shape
