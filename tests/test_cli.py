"""Bad input to segment / synthesize stops with one line naming the file and the problem."""

import functools
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from semflow_jax import image_files, sample
from tests.conftest import REPO


@pytest.fixture()
def files(tmp_path):
  paths = {}
  paths["rgb_mask"] = str(tmp_path / "rgb_mask.png")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(paths["rgb_mask"])
  paths["bad_values"] = str(tmp_path / "bad_values.png")
  labels = np.zeros((8, 8), np.uint8)
  labels[0, :3] = [7, 9, 200]
  labels[1, 0] = 255  # ignore is allowed
  Image.fromarray(labels).save(paths["bad_values"])
  paths["garbage"] = str(tmp_path / "garbage.png")
  with open(paths["garbage"], "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n this is not really a png")
  paths["missing"] = str(tmp_path / "missing.png")
  paths["good_mask"] = str(tmp_path / "good.png")
  Image.fromarray(np.full((8, 8), 3, np.uint8)).save(paths["good_mask"])
  return paths


def test_missing_file(files):
  for fn in (image_files.read_image, lambda p: image_files.read_label_map(p, 7)):
    with pytest.raises(image_files.InputError, match=f"{files['missing']}: no such file"):
      fn(files["missing"])


def test_unreadable_file(files):
  with pytest.raises(image_files.InputError, match=f"{files['garbage']}: not a readable image"):
    image_files.read_image(files["garbage"])


def test_mask_that_is_not_single_channel(files):
  with pytest.raises(image_files.InputError,
                     match=f"{files['rgb_mask']}: not a single-channel label map \\(mode RGB"):
    image_files.read_label_map(files["rgb_mask"], 7)


def test_label_values_outside_the_classes_are_listed(files):
  with pytest.raises(image_files.InputError,
                     match=f"{files['bad_values']}: label values 7, 9, 200 are outside"):
    image_files.read_label_map(files["bad_values"], 7)
  assert image_files.read_label_map(files["good_mask"], 7).max() == 3
  # The same file is fine for a dataset with more classes; 255 passes as ignore.
  assert image_files.read_label_map(files["bad_values"], 201)[1, 0] == 255


def test_missing_output_and_bad_sample_count(files, tiny_config, tmp_path):
  with pytest.raises(image_files.InputError, match="--output is required"):
    sample.segment_file(tiny_config, str(tmp_path), files["good_mask"], None)
  with pytest.raises(image_files.InputError, match="--num_samples must be >= 1"):
    sample.synthesize_file(tiny_config, str(tmp_path), files["good_mask"], str(tmp_path), 0)


@pytest.mark.parametrize("mode,key", [("segment", "missing"), ("segment", "garbage"),
                                      ("synthesize", "rgb_mask"), ("synthesize", "bad_values"),
                                      ("synthesize", "good_mask")])
def test_cli_prints_one_error_line_and_exits_2(files, tmp_path, mode, key):
  out = str(tmp_path / "out")
  proc = subprocess.run(
      [sys.executable, "-m", "semflow_jax.main", "--config=configs/synthetic.py:tiny",
       f"--workdir={tmp_path / 'wd'}", f"--mode={mode}", f"--input={files[key]}",
       f"--output={out}"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 2, proc.stderr[-2000:]
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  # A valid mask gets as far as loading the model, and the workdir holds no checkpoint.
  named = str(tmp_path / "wd") if key == "good_mask" else files[key]
  assert len(error_lines) == 1 and named in error_lines[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not os.path.exists(out)  # nothing half-written


# -- edit, style reference, regional re-sampling (issue #14) -------------------------------------
def test_control_flags_are_checked_before_the_model_is_loaded(files, tiny_config, tmp_path):
  # No checkpoint in tmp_path: each error must come from the flags or files, not from loading.
  photo = str(tmp_path / "photo.png")
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
  small = str(tmp_path / "small.png")
  Image.fromarray(np.zeros((6, 8), np.uint8)).save(small)
  wd, out = str(tmp_path), str(tmp_path / "out")
  with pytest.raises(image_files.InputError, match=f"{small}: label map is 6x8, the photo {photo} "
                     "is 8x8"):
    sample.edit_file(tiny_config, wd, photo, small, out)
  with pytest.raises(image_files.InputError, match=f"{files['bad_values']}: label values 7, 9, 200"):
    sample.edit_file(tiny_config, wd, photo, files["bad_values"], out)
  synth = functools.partial(sample.synthesize_file, tiny_config, wd, files["good_mask"], out, 1)
  for kwargs, message in [
      (dict(style=photo, style_strength=1.5), "--style_strength=1.5 must be in \\[0, 1\\]"),
      (dict(style=photo, style_strength=-0.1), "--style_strength=-0.1 must be in \\[0, 1\\]"),
      (dict(style_strength=0.5), "--style_strength, --colour_transfer and --refine need --style"),
      (dict(resample_classes=["3", "7"]), "--resample_classes: class 7 is outside the "
                                          "dataset's classes 0..6"),
      (dict(resample_classes=["sky"]), "--resample_classes: 'sky' is not a class id"),
      (dict(resample_mask=small), f"{small}: mask is 6x8, the label map .* is 8x8"),
      (dict(resample_classes=["1"], resample_seed=0), "--resample_seed=0 is config.sample.seed"),
      (dict(resample_classes=["1"], style=photo), "cannot be combined")]:
    with pytest.raises(image_files.InputError, match=message):
      synth(**kwargs)
  assert not os.path.exists(out)


@pytest.mark.parametrize("args,named", [
    (["--mode=edit", "--input={photo}", "--labels={small}"], "{small}"),
    (["--mode=synthesize", "--input={mask}", "--style={photo}", "--style_strength=2"],
     "--style_strength=2.0"),
    (["--mode=synthesize", "--input={mask}", "--resample_classes=3,12"], "class 12")])
def test_control_cli_errors_are_one_line(tmp_path, args, named):
  paths = {"photo": str(tmp_path / "photo.png"), "small": str(tmp_path / "small.png"),
           "mask": str(tmp_path / "mask.png")}
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(paths["photo"])
  Image.fromarray(np.zeros((6, 8), np.uint8)).save(paths["small"])
  Image.fromarray(np.zeros((8, 8), np.uint8)).save(paths["mask"])
  out = str(tmp_path / "out")
  proc = subprocess.run(
      [sys.executable, "-m", "semflow_jax.main", "--config=configs/synthetic.py:tiny",
       f"--workdir={tmp_path / 'wd'}", f"--output={out}", *(a.format(**paths) for a in args)],
      cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 2, proc.stderr[-2000:]
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(error_lines) == 1 and named.format(**paths) in error_lines[0], proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and not os.path.exists(out)


# -- the command lines a new user gets wrong (issue #28) -----------------------------------------
_TINY = "--config=configs/synthetic.py:tiny"
# A missing --input file, an unreadable image, a bad label map, a studio --password_file and a
# bad --topology are one line too: test_cli_prints_one_error_line_and_exits_2 above,
# test_studio.py, test_plan.py.
BAD_COMMAND_LINES = [  # (module, arguments, what the one error line must name)
    ("main", ["--config=configs/synthetc.py", "--workdir={wd}"],
     ["--config=configs/synthetc.py: no such config file", "current directory",
      "repository root", "did you mean configs/synthetic.py?"]),
    ("studio", ["--config=configs/synthetc.py", "--workdir={wd}"],
     ["--config=configs/synthetc.py: no such config file", "configs/synthetic.py?"]),
    ("plan", ["--config=configs/sd15.p:tiny", "--topology=cpu-8"],
     ["--config=configs/sd15.p:tiny: no such config file", "configs/sd15.py?"]),
    ("export", ["--config=configs/synthetc.py", "--workdir={wd}", "--output={tmp}/unet"],
     ["--config=configs/synthetc.py: no such config file", "configs/synthetic.py?"]),
    ("main", ["--config=configs/synthetic.py:tinyy", "--workdir={wd}"],
     ["--config=configs/synthetic.py:tinyy", "argument 'tinyy'"]),
    ("main", [_TINY, "--workdir={wd}", "--mode=trian"], ["--mode=trian", "train|eval"]),
    ("main", [_TINY, "--config.train.num_stepz=3", "--workdir={wd}"],
     ["--config.train.num_stepz=3: the config has no key train.num_stepz",
      "did you mean train.num_steps?"]),
    ("main", [_TINY, "--config.train.num_steps=abc", "--workdir={wd}"],
     ["--config.train.num_steps=abc"]),
    ("main", [_TINY, "--workdir={wd}", "--num_samples=four"], ["--num_samples=four"]),
    ("main", [_TINY, "--workdir={wd}", "--inptu=photo.png"], ["inptu"]),
    ("main", [_TINY], ["--workdir is required"]),
    ("main", [_TINY, "--workdir={wd}", "segment"], ["unexpected arguments ['segment']"]),
    ("main", [_TINY, "--workdir={wd}", "--mode=eval"],
     ["no checkpoint in {wd}/checkpoints", "--mode=train --workdir={wd}"]),
    ("export", ["--workdir={wd}", "--output={tmp}/unet"], ["{wd}/config.json: no such file"]),
]


@pytest.mark.parametrize("module,args,named", BAD_COMMAND_LINES,
                         ids=[" ".join([m] + a[1:] if a[0] == _TINY else [m] + a)
                              for m, a, _ in BAD_COMMAND_LINES])
def test_a_bad_command_line_is_one_error_line_and_leaves_nothing(tmp_path, module, args, named):
  paths = {"wd": str(tmp_path / "run"), "tmp": str(tmp_path)}  # the workdir does not exist
  module = "semflow_jax.studio" if module == "studio" else f"semflow_jax.{module}"
  env = {**os.environ, "XLA_FLAGS": ""}
  env.pop("JAX_COMPILATION_CACHE_DIR")  # the default: train and eval cache in the workdir
  proc = subprocess.run([sys.executable, "-m", module, *(a.format(**paths) for a in args)],
                        cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines()
           if l.strip() and not re.match(r"[IW]\d{4} ", l)]  # absl's INFO and WARNING lines
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-3000:]
  for part in named:
    assert part.format(**paths) in lines[0], lines[0]
  assert os.listdir(tmp_path) == []  # a refused command writes nothing (no workdir, no cache)
