"""The three manual-download builders, built from fixture trees in the official layouts."""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from cityscapesscripts.helpers import labels as cs_labels
from PIL import Image

from semflow_jax.data import celebamask_hq, cityscapes, coco_stuff, manual
from tests import dataset_fixtures as fx
from tests.conftest import REPO

NAMES = ("coco_stuff", "cityscapes_semantic", "celebamask_hq")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """{name: (builder, manual dir, what the writer wrote)} built once for the module."""
  root = tmp_path_factory.mktemp("datasets")
  out = {}
  for name in NAMES:
    manual_dir = root / "manual" / name
    written = fx.WRITERS[name](str(manual_dir))
    out[name] = (fx.build(name, manual_dir, root / "tfds"), manual_dir, written)
  return out


def test_every_builder_has_the_common_features_and_class_names(built):
  expected_classes = {"coco_stuff": 171, "cityscapes_semantic": 19, "celebamask_hq": 19}
  for name, (builder, _, _) in built.items():
    features = builder.info.features
    assert features["image"].shape == (None, None, 3) and features["image"].np_dtype == np.uint8
    assert features["label"].shape == (None, None, 1) and features["label"].np_dtype == np.uint8
    assert "file_name" in features
    assert len(builder.info.metadata["class_names"]) == expected_classes[name]
    assert "Download" in builder.MANUAL_DOWNLOAD_INSTRUCTIONS
    assert f"python -m semflow_jax.data.build {name}" in sys.modules[type(builder).__module__].__doc__


def test_coco_stuff_maps_raw_ids_to_171_contiguous_classes(built):
  builder, _, written = built["coco_stuff"]
  names = builder.info.metadata["class_names"]
  assert names[0] == "person" and names[11] == "stop sign" and names[79] == "toothbrush"
  assert names[80] == "banner" and names[170] == "wood"
  assert builder.info.splits["train"].num_examples == 4
  assert builder.info.splits["validation"].num_examples == 3
  for split, folder in (("train", "train2017"), ("validation", "val2017")):
    decoded = fx.examples(builder, split)
    assert set(decoded) == {f"{stem}.jpg" for stem, *_ in written[folder]}
    for stem, _, _, raw in written[folder]:
      ex = decoded[f"{stem}.jpg"]
      expected = np.vectorize(fx.COCO_RAW_TO_EXPECTED.get)(raw)
      np.testing.assert_array_equal(ex["label"][..., 0], expected)
      assert ex["image"].shape == raw.shape + (3,)
  # JPEGs are stored byte for byte (no re-encoding).
  stored = builder.as_data_source("train",
                                  deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
  for record in stored:
    feature = tf.train.Example.FromString(record).features.feature
    stem = feature["file_name"].bytes_list.value[0].decode()[:-4]
    with open(_coco_image_path(written, stem), "rb") as f:
      assert feature["image"].bytes_list.value[0] == f.read()


def _coco_image_path(written, stem):
  return {s: path for s, path, _, _ in written["train2017"]}[stem]


def test_coco_stuff_table_drops_exactly_the_unused_thing_ids():
  unused = tuple(raw for raw, name in enumerate(coco_stuff.RAW_NAMES) if name is None)
  assert unused == (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)
  mapped = [coco_stuff.RAW_TO_CLASS[r] for r in range(182) if r not in unused]
  assert mapped == list(range(171))
  assert coco_stuff.RAW_TO_CLASS[12] == 11 and coco_stuff.RAW_TO_CLASS[181] == 170
  assert coco_stuff.RAW_TO_CLASS[255] == 255


def test_cityscapes_label_table_matches_cityscapesscripts():
  for label in cs_labels.labels:
    train_id = label.trainId if 0 <= label.trainId < 255 else 255
    assert cityscapes.RAW_TO_CLASS[label.id % 256] == train_id, label.name
  assert set(cityscapes.RAW_TO_CLASS) == {label.id % 256 for label in cs_labels.labels}
  official = [cs_labels.trainId2label[i].name for i in range(19)]
  assert list(cityscapes.CLASS_NAMES) == official


def test_cityscapes_maps_label_ids_to_train_ids(built):
  builder, _, written = built["cityscapes_semantic"]
  lookup = np.full(256, -1)
  for label in cs_labels.labels:  # the reference, not the module under test
    lookup[label.id % 256] = label.trainId if 0 <= label.trainId < 255 else 255
  assert lookup[cs_labels.name2label["road"].id] == 0
  assert lookup[cs_labels.name2label["license plate"].id % 256] == 255
  for split in ("train", "validation"):
    decoded = fx.examples(builder, split)
    folder = "train" if split == "train" else "val"
    assert len(decoded) == len(written[folder])
    for _, image_path, _, raw in written[folder]:
      ex = decoded[os.path.basename(image_path)]
      np.testing.assert_array_equal(ex["label"][..., 0], lookup[raw])
      np.testing.assert_array_equal(ex["image"], np.asarray(Image.open(image_path)))  # lossless


def test_celebamask_hq_paints_parts_in_the_standard_order(built):
  builder, _, written = built["celebamask_hq"]
  decoded = {**fx.examples(builder, "train"), **fx.examples(builder, "validation")}
  assert set(fx.examples(builder, "train")) == {"0.jpg", "1.jpg", "2.jpg"}  # fixed split
  assert set(fx.examples(builder, "validation")) == {"28000.jpg", "28001.jpg"}
  parts = celebamask_hq.PARTS
  assert parts[:5] == ("skin", "nose", "eye_g", "l_eye", "r_eye") and parts[-1] == "cloth"
  for index in written:
    label = decoded[f"{index}.jpg"]["label"][..., 0]
    masks = fx.celeba_part_masks(index)
    expected = np.zeros_like(label)
    for part in parts:  # the painting order stated by the dataset
      if part in masks:
        expected[masks[part]] = parts.index(part) + 1
    np.testing.assert_array_equal(label, expected)
    # Spot checks that make the order visible.
    assert label[3, 8] == 1 + parts.index("hair")     # hair over skin
    assert label[5, 4] == 1 + parts.index("l_eye")    # l_eye over eye_g
    assert label[5, 10] == 1 + parts.index("eye_g")
    assert label[8, 3] == 1 + parts.index("skin") and label[15, 0] in (0, 18)
    image = decoded[f"{index}.jpg"]["image"]
    assert image.shape == (fx.CELEBA_MASK_SIZE, fx.CELEBA_MASK_SIZE, 3)  # resized to the masks
    reference = np.asarray(Image.open(written[index][0]).convert("RGB").resize(
        (fx.CELEBA_MASK_SIZE,) * 2, Image.Resampling.BICUBIC), int)
    assert np.abs(image.astype(int) - reference).mean() < 3


def test_celebamask_hq_uses_the_celeba_partition_when_the_files_are_there(tmp_path):
  indices = (0, 1, 2, 3, 28000)
  fx.write_celebamask_hq(str(tmp_path / "m"), indices=indices)
  partition = {0: 1, 1: 0, 2: 2, 3: 0, 28000: 0}
  fx.write_celeba_partition(str(tmp_path / "m"), partition)
  builder = fx.build("celebamask_hq", tmp_path / "m", tmp_path / "tfds")
  splits = {split: set(fx.examples(builder, split)) for split in builder.info.splits}
  assert splits == {"train": {"1.jpg", "3.jpg", "28000.jpg"}, "validation": {"0.jpg"},
                    "test": {"2.jpg"}}


# -- bad data -------------------------------------------------------------------------------------

def _first(written, name):
  """(image path, label path) of one example of the fixture `written` for dataset `name`."""
  if name == "coco_stuff":
    _, image, label, _ = written["train2017"][0]
  elif name == "cityscapes_semantic":
    _, image, label, _ = written["train"][0]
  else:
    image, parts = written[0]
    label = parts["nose"]
  return image, label


def _break(name, case, written):
  """Damage the fixture; returns the path the error must name."""
  image, label = _first(written, name)
  if case == "image_without_label":
    if name == "celebamask_hq":
      for path in written[0][1].values():
        os.remove(path)
    else:
      os.remove(label)
    return image
  if case == "label_without_image":
    os.remove(image)
    return label if name != "celebamask_hq" else written[0][1]["skin"]
  if case == "unreadable_image":
    with open(image, "wb") as f:
      f.write(b"\xff\xd8\xff\xe0 not really a JPEG or PNG")
    return image
  if case == "unknown_label_value":
    if name == "celebamask_hq":  # the class table here is the part list
      bad = os.path.join(os.path.dirname(label), "00000_moustache.png")
      shutil.copy(label, bad)
      return bad
    raw = np.asarray(Image.open(label)).copy()
    raw[0, 0] = 200 if name == "coco_stuff" else 40  # 200 > 181; 40 > 33
    Image.fromarray(raw).save(label)
    return label
  if case == "size_mismatch":
    raw = np.asarray(Image.open(label))
    Image.fromarray(raw[:-2]).save(label)
    return image if name != "celebamask_hq" else label
  raise AssertionError(case)


CASES = ("image_without_label", "label_without_image", "unreadable_image",
         "unknown_label_value", "size_mismatch")


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_bad_data_names_the_file_and_leaves_no_dataset(name, case, tmp_path):
  manual_dir = tmp_path / "manual"
  written = fx.WRITERS[name](str(manual_dir))
  culprit = _break(name, case, written)
  with pytest.raises(manual.DataError) as e:
    fx.build(name, manual_dir, tmp_path / "tfds")
  assert str(e.value).startswith(str(culprit)), str(e.value)
  dataset_dir = tmp_path / "tfds" / name
  left = [os.path.join(d, f) for d, _, fs in os.walk(dataset_dir) for f in fs]
  assert left == [], left  # no half-written dataset


def test_unknown_coco_thing_id_is_rejected(tmp_path):
  written = fx.write_coco_stuff(str(tmp_path / "m"))
  label = written["val2017"][1][2]
  raw = np.asarray(Image.open(label)).copy()
  raw[3, 3] = 11  # 'street sign': a COCO id that was never annotated
  Image.fromarray(raw).save(label)
  with pytest.raises(manual.DataError, match=f"^{label}: label values 11 are not in"):
    fx.build("coco_stuff", tmp_path / "m", tmp_path / "tfds")


@pytest.mark.parametrize("name", NAMES)
def test_missing_manual_dir_prints_the_instructions(name, tmp_path):
  missing = tmp_path / "not_downloaded"
  with pytest.raises(manual.DataError) as e:
    fx.build(name, missing, tmp_path / "tfds")
  message = str(e.value)
  assert str(missing) in message and "Download" in message and "manual_dir" in message


def test_missing_sub_directory_names_it_and_prints_the_layout(tmp_path):
  written = fx.write_cityscapes(str(tmp_path / "m"))
  shutil.rmtree(tmp_path / "m" / "gtFine" / "val")
  with pytest.raises(manual.DataError) as e:
    fx.build("cityscapes_semantic", tmp_path / "m", tmp_path / "tfds")
  assert str(e.value).startswith(str(tmp_path / "m" / "gtFine" / "val"))
  assert "gtFine_labelIds.png" in str(e.value)
  assert written  # the rest of the tree was fine


def test_build_command_builds_and_reports_a_bad_file_in_one_line(tmp_path):
  written = fx.write_cityscapes(str(tmp_path / "m"))
  cmd = [sys.executable, "-m", "semflow_jax.data.build", "cityscapes_semantic",
         f"--manual_dir={tmp_path / 'm'}", f"--data_dir={tmp_path / 'tfds'}"]
  env = {**os.environ, "XLA_FLAGS": ""}
  ok = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-2000:]
  assert "train 8, validation 3" in ok.stdout
  bad_label = written["val"][0][2]
  os.remove(bad_label)
  cmd[-1] = f"--data_dir={tmp_path / 'tfds2'}"
  bad = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  image = written["val"][0][1]
  assert bad.returncode == 2
  assert f"error: {image}: image without a label" in bad.stderr


def test_celebamask_hq_image_that_is_not_a_multiple_of_the_masks_is_rejected(tmp_path):
  written = fx.write_celebamask_hq(str(tmp_path / "m"))
  image = written[1][0]
  Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(image)  # masks are 16x16
  with pytest.raises(manual.DataError, match=f"^{image}: image is 20x20 but its label"):
    fx.build("celebamask_hq", tmp_path / "m", tmp_path / "tfds")


# -- building in parallel shards, interrupted and resumed ----------------------------------------

def _records(builder):
  """{split: [tf.train.Example]}: what a reader gets, every feature byte for byte (parsed: the
  order of a proto map's entries in the serialized bytes may differ between processes)."""
  return {split: [tf.train.Example.FromString(r) for r in builder.as_data_source(
      split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)]
      for split in builder.info.splits}


def test_killed_build_is_invisible_and_a_rerun_on_two_workers_completes_it(tmp_path):
  import signal
  import time
  from semflow_jax.data import records
  from semflow_jax.data import pipeline
  from configs import cityscapes as cityscapes_config
  manual_dir = tmp_path / "m"
  fx.write_cityscapes(str(manual_dir), size=(192, 384))  # big enough to take a moment each
  reference = _records(fx.build("cityscapes_semantic", manual_dir, tmp_path / "reference"))
  data_dir = tmp_path / "tfds"
  cmd = [sys.executable, "-m", "semflow_jax.data.build", "cityscapes_semantic",
         f"--manual_dir={manual_dir}", f"--data_dir={data_dir}", "--examples_per_shard=1"]
  env = {**os.environ, "XLA_FLAGS": ""}
  staging = data_dir / "cityscapes_semantic" / "incomplete.shards_1.1.0" / ".shards_done"
  proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while proc.poll() is None and time.time() < deadline:
    if staging.is_dir() and len(os.listdir(staging)) >= 2:  # 11 shards of one example
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.005)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL, "the build ended before it could be killed"
  written = len(os.listdir(staging))
  assert 2 <= written < 11
  # A reader sees no dataset, only the instructions to build one.
  builder = tfds.builder("cityscapes_semantic", data_dir=str(data_dir))
  assert not builder.is_prepared()
  config = cityscapes_config.get_config("local")
  config.data.tfds_data_dir = str(data_dir)
  with pytest.raises(FileNotFoundError, match="is not built in"):
    pipeline.get_builder(config.data)
  # The same build on two workers (one with two processes) writes only the missing shards.
  runs = [subprocess.Popen(cmd + ["--num_workers=2", f"--worker_index={i}"]
                           + (["--processes=2"] if i == 1 else []),
                           cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True) for i in (1, 0)]
  outputs = [p.communicate(timeout=300) for p in runs]
  for p, (_, err) in zip(runs, outputs):
    assert p.returncode == 0, err[-2000:]
  worker1, worker0 = (out for out, _ in outputs)
  assert "wrote its shards" in worker1 and "train 8, validation 3" in worker0
  shards_written = sum(int(line.split("writing ")[1].split(" of")[0])
                       for out in (worker0, worker1) for line in out.splitlines()
                       if line.startswith("cityscapes_semantic: writing"))
  assert shards_written == 11 - written
  built = tfds.builder("cityscapes_semantic", data_dir=str(data_dir))
  assert built.is_prepared() and records.is_array_record(built)
  assert _records(built) == reference  # the same bytes as one uninterrupted build
  assert sorted(os.listdir(data_dir / "cityscapes_semantic")) == ["1.1.0"]  # staging gone


def test_old_tfrecord_dataset_gets_one_line_with_the_command(tmp_path):
  from semflow_jax.data import pipeline
  from configs import coco_stuff as coco_config
  old = tmp_path / "tfds" / "coco_stuff" / "1.0.0"
  old.mkdir(parents=True)
  (old / "dataset_info.json").write_text("{}")
  (old / "features.json").write_text("{}")
  config = coco_config.get_config("local")
  config.data.tfds_data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError) as e:
    pipeline.get_builder(config.data)
  message = str(e.value)
  assert "\n" not in message and "old TFRecord format (version 1.0.0)" in message
  assert f"python -m semflow_jax.data.build coco_stuff --manual_dir=<dir> --data_dir=" \
         f"{tmp_path / 'tfds'}" in message


def test_a_tfrecord_build_is_refused_by_name(tmp_path):
  from semflow_jax.data import pipeline
  from configs import coco_stuff as coco_config
  fx.write_coco_stuff(str(tmp_path / "m"))
  builder = tfds.builder("coco_stuff", data_dir=str(tmp_path / "tfds"), file_format="tfrecord")
  builder.download_and_prepare(  # tfds' own writer, in the format every build had before
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "m")))
  config = coco_config.get_config("local")
  config.data.tfds_data_dir = str(tmp_path / "tfds")
  with pytest.raises(FileNotFoundError, match="stored as tfrecord, not ArrayRecord; rewrite it "
                     "for random access: `python -m semflow_jax.data.build coco_stuff"):
    pipeline.get_builder(config.data)
  # tfds' own writer (ArrayRecord now) and the sharded build store the same records in order.
  native = tfds.builder("coco_stuff", data_dir=str(tmp_path / "native"))
  native.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=str(tmp_path / "m")))
  sharded = fx.build("coco_stuff", tmp_path / "m", tmp_path / "sharded", examples_per_shard=2)
  assert sharded.info.splits["train"].num_shards == 2
  assert _records(native) == _records(sharded)
