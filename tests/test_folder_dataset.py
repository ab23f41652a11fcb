"""Your own data: a folder of images and label maps built into tfds (semflow_jax/data/folder.py)
and trained with configs/folder.py; every malformed folder stops in one line naming the file."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from semflow_jax.data import folder, manual, pipeline
from tests import dataset_fixtures as fx
from tests.conftest import REPO


def _tiny_folder_config(root, tfds_dir):
  from configs import folder as folder_config
  config = folder_config.get_config("local")
  config.data.folder = str(root)
  config.data.num_classes = len(fx.FOLDER_CLASSES)
  config.data.tfds_data_dir = str(tfds_dir)
  config.data.image_size = (16, 16)
  config.model.attention_resolutions = (4,)
  config.model.patch_size = 1
  config.train.num_steps = 2
  config.train.checkpoint_every = 2
  config.train.tensorboard = False
  config.eval.seg_steps = (1,)
  config.eval.synth_steps = 1
  return config


def _files_under(path):
  return [os.path.join(d, f) for d, _, names in os.walk(path) for f in names]


def test_a_folder_with_two_splits_trains_and_evaluates(tmp_path):
  root = tmp_path / "my_data"
  written = fx.write_folder_dataset(str(root))
  config = _tiny_folder_config(root, tmp_path / "tfds")
  # The README's command (`python -m semflow_jax.main --config=configs/folder.py:local
  # --workdir=runs/my_data --config.data.folder=/data/my_dataset --config.data.num_classes=5`),
  # shortened by the overrides of _tiny_folder_config; it builds the dataset on first use.
  overrides = {"data.folder": root, "data.num_classes": 5, "data.tfds_data_dir": tmp_path / "tfds",
               "data.image_size": "(16,16)", "model.attention_resolutions": "(4,)",
               "model.patch_size": 1, "train.num_steps": 2, "train.checkpoint_every": 2,
               "train.tensorboard": False, "eval.seg_steps": "(1,)", "eval.synth_steps": 1}
  run = subprocess.run(
      [sys.executable, "-m", "semflow_jax.main", "--config=configs/folder.py:local",
       f"--workdir={tmp_path / 'run'}"] + [f"--config.{k}={v}" for k, v in overrides.items()],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  with open(tmp_path / "run" / "eval" / "metrics_2.json") as f:
    result = json.load(f)
  assert result["step"] == 2 and result["num_examples"] == len(written["validation"]) == 4
  assert np.isfinite(result["miou_euler_1"]) and np.isfinite(result["roundtrip_miou"])
  assert list(result["per_class_iou_euler_1"]) == list(fx.FOLDER_CLASSES)

  builder = pipeline.get_builder(config.data)  # built: read, not built again
  assert builder.info.splits["train"].num_examples == 8
  assert pipeline.class_names(builder, 5) == list(fx.FOLDER_CLASSES)
  for split in ("train", "validation"):
    stored = fx.examples(builder, split)
    assert sorted(stored) == [name for name, *_ in written[split]]
    for name, image_path, _, label in written[split]:
      np.testing.assert_array_equal(stored[name]["label"][..., 0], label)  # 255 region kept
      assert (stored[name]["label"] == 255).sum() == 35
      image = np.asarray(Image.open(image_path).convert("RGB"))
      if image_path.endswith(".png"):
        np.testing.assert_array_equal(stored[name]["image"], image)  # lossless
      else:
        assert stored[name]["image"].shape == image.shape


def test_without_split_folders_a_fraction_is_held_out_by_name(tmp_path):
  written = fx.write_folder_dataset(str(tmp_path / "d"), splits=(("", 12),))[""]
  pairs = folder.split_pairs(str(tmp_path / "d"), 0.25)
  assert [len(pairs["train"]), len(pairs["validation"])] == [9, 3]
  assert sorted(p[0] for s in pairs.values() for p in s) == [w[0] for w in written]
  # The split depends on the names only: the same files elsewhere split the same way.
  shutil.copytree(tmp_path / "d", tmp_path / "elsewhere")
  assert folder.split_pairs(str(tmp_path / "elsewhere"), 0.25)["validation"] == [
      (n, i.replace("/d/", "/elsewhere/"), l.replace("/d/", "/elsewhere/"))
      for n, i, l in pairs["validation"]]
  with pytest.raises(folder.FolderError, match="cannot make a train and a validation split"):
    fx.write_folder_dataset(str(tmp_path / "one"), splits=(("", 1),))
    folder.split_pairs(str(tmp_path / "one"), 0.1)


def test_classes_json_remaps_values_and_names_an_ignore_value(tmp_path):
  root = tmp_path / "d"
  written = fx.write_folder_dataset(
      str(root), splits=(("train", 2), ("validation", 1)), classes=("a", "b"),
      extra={"colours": [[255, 0, 0], [0, 0, 255]], "ignore": 7,
             "remap": {"0": 1, "1": 0, "2": 0, "3": 255, "4": 1}})
  label_path = written["train"][0][2]
  raw = np.asarray(Image.open(label_path)).copy()
  raw[-1, -1] = 7  # the ignore value
  Image.fromarray(raw).save(label_path)
  builder = folder.prepare(folder.builder(str(root), data_dir=str(tmp_path / "tfds")))
  table = np.full(256, 255)
  table[[0, 1, 2, 4]] = [1, 0, 0, 1]
  stored = fx.examples(builder, "train")[written["train"][0][0]]["label"][..., 0]
  np.testing.assert_array_equal(stored, table[raw])
  assert builder.info.metadata["classes"]["colours"] == [[255, 0, 0], [0, 0, 255]]
  from semflow_jax.data import classes
  config = _tiny_folder_config(root, tmp_path)
  config.data.num_classes = 2
  assert classes.of(config.data).names == ("a", "b")
  np.testing.assert_array_equal(classes.of(config.data).colours, [[255, 0, 0], [0, 0, 255]])


def test_a_changed_folder_is_built_again(tmp_path):
  root = tmp_path / "d"
  written = fx.write_folder_dataset(str(root))
  first = folder.prepare(folder.builder(str(root), data_dir=str(tmp_path / "tfds")))
  name, _, label_path, label = written["validation"][0]
  relabelled = np.where(label == 255, 255, 0).astype(np.uint8)
  Image.fromarray(relabelled).save(label_path)
  again = folder.prepare(folder.builder(str(root), data_dir=str(tmp_path / "tfds")))
  assert again.data_dir == first.data_dir  # same folder, same name: rebuilt in place
  np.testing.assert_array_equal(fx.examples(again, "validation")[name]["label"][..., 0],
                                relabelled)


# -- malformed folders -----------------------------------------------------------------------------
def _break(case, root, written):
  """Damage the folder; returns the path the error must start with."""
  name, image, label, _ = written["train"][1]
  if case == "image_without_label":
    os.remove(label)
    return image
  if case == "label_without_image":
    os.remove(image)
    return label
  if case == "sizes_differ":
    Image.fromarray(np.asarray(Image.open(label))[:-3]).save(label)
    return image
  if case == "id_outside_the_classes":
    raw = np.asarray(Image.open(label)).copy()
    raw[10, 10] = 5  # 5 classes: 0..4
    Image.fromarray(raw).save(label)
    return label
  if case == "unreadable_image":
    with open(image, "wb") as f:
      f.write(b"\x89PNG\r\n\x1a\n not an image")
    return image
  if case == "colour_label_map":
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(label)
    return label
  if case == "bad_classes_json":
    with open(os.path.join(root, "classes.json"), "w") as f:
      f.write('{"classes": ["a", "a"]}')
    return os.path.join(root, "classes.json")
  if case == "missing_validation_folder":
    shutil.rmtree(os.path.join(root, "validation"))
    return os.path.join(root, "validation")
  raise AssertionError(case)


CASES = ("image_without_label", "label_without_image", "sizes_differ", "id_outside_the_classes",
         "unreadable_image", "colour_label_map", "bad_classes_json", "missing_validation_folder")


@pytest.mark.parametrize("case", CASES)
def test_a_malformed_folder_names_the_file_and_leaves_no_dataset(case, tmp_path):
  root = str(tmp_path / "d")
  culprit = _break(case, root, fx.write_folder_dataset(root))
  with pytest.raises(manual.DataError) as e:  # FolderError, or manual's pairing error
    folder.prepare(folder.builder(root, data_dir=str(tmp_path / "tfds")))
  message = str(e.value)
  assert message.startswith(culprit) and "\n" not in message, message
  assert _files_under(tmp_path / "tfds") == []  # nothing half-built


def test_the_config_is_checked_against_classes_json(tmp_path):
  root = tmp_path / "d"
  fx.write_folder_dataset(str(root))
  config = _tiny_folder_config(root, tmp_path / "tfds")
  config.data.num_classes = 7
  with pytest.raises(folder.FolderError, match=r"classes.json lists 5 classes, but "
                     r"config.data.num_classes=7; pass --config.data.num_classes=5"):
    folder.check_config(config.data)
  config.data.folder = None
  with pytest.raises(folder.FolderError, match="config.data.folder is not set"):
    folder.check_config(config.data)


def test_the_commands_report_a_bad_folder_in_one_line(tmp_path):
  root = str(tmp_path / "d")
  written = fx.write_folder_dataset(root)
  culprit = _break("id_outside_the_classes", root, written)
  env = {**os.environ, "XLA_FLAGS": ""}
  build = subprocess.run(
      [sys.executable, "-m", "semflow_jax.data.build", "folder_dataset", f"--manual_dir={root}",
       f"--data_dir={tmp_path / 'tfds'}"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert build.returncode == 2, build.stderr[-2000:]
  errors = [l for l in build.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and errors[0].startswith(f"error: {culprit}: label values 5 are not "
                                                   "classes of classes.json"), build.stderr
  train_run = subprocess.run(
      [sys.executable, "-m", "semflow_jax.main", "--config=configs/folder.py:local",
       f"--workdir={tmp_path / 'run'}", f"--config.data.folder={root}",
       "--config.data.num_classes=4", f"--config.data.tfds_data_dir={tmp_path / 'tfds'}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert train_run.returncode == 2 and "Traceback" not in train_run.stderr
  assert train_run.stderr.strip().splitlines()[-1] == (
      f"error: {root}/classes.json lists 5 classes, but config.data.num_classes=4; pass "
      "--config.data.num_classes=5")
  assert not os.path.exists(tmp_path / "run")  # refused before anything was written
  assert _files_under(tmp_path / "tfds") == []
