"""Whole folders and splits in one process (sample_many.segment_many / synthesize_many): the same
labels as one image at a time, one compilation, resumable, the official output formats scored
by the official tools."""

import contextlib
import logging
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from semflow_jax import evaluate, image_files, images, parallel, resize, sample, sample_many
from semflow_jax.data import classes, pipeline
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow
from tests import dataset_fixtures as fx
from tests.conftest import REPO


@contextlib.contextmanager
def _absl_info(lines):
  """The INFO lines absl logs meanwhile, appended to `lines`."""
  class Collect(logging.Handler):
    def emit(self, record):
      lines.append(record.getMessage())
  logger, handler = logging.getLogger("absl"), Collect(logging.INFO)
  level = logger.level
  logger.addHandler(handler)
  logger.setLevel(logging.INFO)
  try:
    yield
  finally:
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def model_and_params(tmp_path_factory):
  """The tiny config's model with random weights: segmentation then follows the photo's colours
  (a varied label map), which is all these tests need."""
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.data.tfds_data_dir = str(tmp_path_factory.mktemp("tfds"))
  config.eval.batch_size = 16  # two rows per device: batches of 16, the last one padded
  config.sample.seg_steps = 2
  model = SemFlow.from_config(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0))
  return config, model, params


def _photo_folder(root, count=20, seed=0):
  """`count` photos of mixed sizes (one in a sub-folder, one a JPEG); {name: path}."""
  rng = np.random.default_rng(seed)
  sizes = ((16, 16), (24, 40), (9, 13), (33, 20), (16, 32))
  out = {}
  for i in range(count):
    h, w = sizes[i % len(sizes)]
    name = f"sub/photo_{i:02d}" if i == 3 else f"photo_{i:02d}"
    ext = ".jpg" if i == 7 else ".png"
    path = os.path.join(root, name + ext)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    out[name] = path
  return out


def test_a_folder_gives_the_labels_of_single_images_with_one_compilation(model_and_params,
                                                                         tmp_path):
  config, model, params = model_and_params
  photos = _photo_folder(str(tmp_path / "photos"))
  batched = sample.Predictor(config, model, params)
  result = sample_many.segment_many(config, "", str(tmp_path / "photos"), str(tmp_path / "out"),
                               predictor=batched)
  assert result == {"written": 20, "skipped": 0, "output": str(tmp_path / "out")}
  segment = batched.programs.segment(config.sample.seg_steps, config.sample.method)
  assert segment.num_executables == 1  # 20 images, 5 sizes, 2 batches: one program

  one_at_a_time = sample.Predictor(config, model, params)  # its own programs
  for name, path in photos.items():
    written = np.asarray(Image.open(tmp_path / "out" / "labels" / (name + ".png")))
    expected = one_at_a_time.segment(image_files.read_image(path))
    assert written.shape == expected.shape == np.asarray(Image.open(path)).shape[:2]
    np.testing.assert_array_equal(written, expected, err_msg=name)
  assert len(np.unique(written)) > 1  # a real test case

  # Run again: everything is there, nothing is computed or rewritten.
  first = {n: os.stat(tmp_path / "out" / "labels" / (n + ".png")).st_mtime_ns for n in photos}
  os.remove(tmp_path / "out" / "labels" / "photo_05.png")
  again = sample_many.segment_many(config, "", str(tmp_path / "photos"), str(tmp_path / "out"),
                              predictor=batched)
  assert (again["written"], again["skipped"]) == (1, 19)
  for n in photos:
    if n != "photo_05":
      assert os.stat(tmp_path / "out" / "labels" / (n + ".png")).st_mtime_ns == first[n], n
  np.testing.assert_array_equal(
      np.asarray(Image.open(tmp_path / "out" / "labels" / "photo_05.png")),
      one_at_a_time.segment(image_files.read_image(photos["photo_05"])))
  assert segment.num_executables == 2  # one more batch shape: 1 row per device

  # A third run has nothing left to do: it says so, loads no model (the workdir need not
  # exist), and the command exits 0.
  logs = []
  with _absl_info(logs):
    third = sample_many.segment_many(config, str(tmp_path / "no_run"), str(tmp_path / "photos"),
                                str(tmp_path / "out"))
  assert third == {"written": 0, "skipped": 20, "output": str(tmp_path / "out")}
  assert any("outputs of all 20 inputs already exist" in l and "nothing left to do" in l
             for l in logs), logs
  assert not any("nan" in l for l in logs), logs
  proc = subprocess.run(
      [sys.executable, "-m", "semflow_jax.main", "--config=configs/synthetic.py:tiny",
       f"--workdir={tmp_path / 'no_run'}", "--mode=segment", f"--input={tmp_path / 'photos'}",
       f"--output={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "outputs of all 20 inputs already exist" in proc.stderr, proc.stderr[-2000:]
  assert " nan " not in proc.stderr and not os.path.exists(tmp_path / "no_run")


def test_a_glob_and_an_unreadable_file(model_and_params, tmp_path):
  config, model, params = model_and_params
  photos = _photo_folder(str(tmp_path / "photos"), count=4)
  with open(tmp_path / "photos" / "broken.png", "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n not an image")
  predictor = sample.Predictor(config, model, params)
  with pytest.raises(image_files.InputError,
                     match=f"^{tmp_path}/photos/broken.png: not a readable image .*; the other "
                           f"outputs are in {tmp_path}/out$"):
    sample_many.segment_many(config, "", str(tmp_path / "photos" / "*.png"), str(tmp_path / "out"),
                        predictor=predictor)
  written = sorted(os.listdir(tmp_path / "out" / "labels"))
  assert written == sorted(n + ".png" for n in photos if "/" not in n)  # the glob: no sub/
  for bad, message in [(str(tmp_path / "nothing*.png"), "no input files"),
                       (str(tmp_path / "missing"), "missing: no such folder")]:
    with pytest.raises(image_files.InputError, match=message):
      sample_many.segment_many(config, "", bad, str(tmp_path / "out2"), predictor=predictor)


def test_synthesis_of_a_folder_keys_every_sample_by_its_input(model_and_params, tmp_path):
  config, model, params = model_and_params
  rng = np.random.default_rng(3)
  maps = {}
  for i, (h, w) in enumerate(((16, 16), (20, 12), (16, 24))):
    labels = rng.integers(0, config.data.num_classes, (h, w)).astype(np.uint8)
    maps[f"mask_{i}"] = labels
    Image.fromarray(labels).save(tmp_path / f"mask_{i}.png")
  predictor = sample.Predictor(config, model, params)
  result = sample_many.synthesize_many(config, "", str(tmp_path / "mask_*.png"),
                                  str(tmp_path / "all"), 2, predictor=predictor)
  assert result["written"] == 3
  for name, labels in maps.items():
    a, b = (np.asarray(Image.open(tmp_path / "all" / f"{name}_{i}.png")) for i in (0, 1))
    assert a.shape == (*labels.shape, 3) and not np.array_equal(a, b)
  # Alone, an input gets the same samples: its noise depends on its name, not on the batch.
  sample_many.synthesize_many(config, "", str(tmp_path / "mask_2.png*"), str(tmp_path / "alone"), 2,
                         predictor=predictor)
  for i in (0, 1):
    with open(tmp_path / "all" / f"mask_2_{i}.png", "rb") as f1, \
         open(tmp_path / "alone" / f"mask_2_{i}.png", "rb") as f2:
      assert f1.read() == f2.read()
  # Again: every sample is there, nothing is left to do and no model is loaded.
  logs = []
  with _absl_info(logs):
    again = sample_many.synthesize_many(config, str(tmp_path / "no_run"), str(tmp_path / "mask_*.png"),
                                   str(tmp_path / "all"), 2)
  assert (again["written"], again["skipped"]) == (0, 3)
  assert any("outputs of all 3 inputs already exist" in l for l in logs), logs


def test_outputs_are_checked_before_anything_is_loaded(tmp_path, tiny_config):
  photo = tmp_path / "photo.png"
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photo)
  (tmp_path / "a_dir").mkdir()
  no_run = str(tmp_path / "no_run")  # no checkpoint: reaching the model would fail otherwise
  for call, message in [
      (lambda: sample.segment_file(tiny_config, no_run, str(photo), str(tmp_path / "a_dir")),
       f"--output={tmp_path}/a_dir is a directory; this mode writes the label map PNG"),
      (lambda: sample.synthesize_file(tiny_config, no_run, str(photo), str(photo), 2),
       f"--output={photo} is a file; this mode writes a directory of samples"),
      (lambda: sample_many.segment_many(tiny_config, no_run, str(tmp_path), str(photo)),
       f"--output={photo} is a file; this mode writes a directory"),
      (lambda: sample_many.segment_many(tiny_config, no_run, str(tmp_path), str(tmp_path / "o"),
                                   split="validation"),
       "give one of them"),
      (lambda: sample.edit_file(tiny_config, no_run, str(photo), str(photo),
                                str(tmp_path / "a_dir")), "is a directory")]:
    with pytest.raises(image_files.InputError, match=message):
      call()
  assert sorted(os.listdir(tmp_path)) == ["a_dir", "photo.png"]


def test_official_formats_invert_the_builders_tables():
  from cityscapesscripts.helpers import labels as cs_labels
  from semflow_jax.data import coco_stuff
  folder, table = classes.official_format("cityscapes_semantic")  # pyright: ignore[reportGeneralTypeIssues]
  assert folder == "labelIds"
  assert [int(table[c]) for c in range(19)] == [cs_labels.trainId2label[c].id for c in range(19)]
  folder, table = classes.official_format("coco_stuff")  # pyright: ignore[reportGeneralTypeIssues]
  assert folder == "stuffthingmaps" and table[255] == 255
  assert [coco_stuff.RAW_TO_CLASS[int(table[c])] for c in range(171)] == list(range(171))
  assert int(table[11]) == 12 and int(table[170]) == 181  # stop sign, wood (COCO id - 1)
  assert classes.official_format("synthetic_scenes") is None


def test_a_cityscapes_split_scored_by_cityscapesscripts_equals_the_projects_miou(tmp_path):
  """--split=validation writes labelIds at 64x32 (the fixture's native size) for the model's
  16x32 predictions; cityscapesscripts' evalPixelLevelSemanticLabeling on them gives the
  evaluator's mIoU for the same parameters."""
  from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
  from configs import cityscapes
  written = fx.write_cityscapes(str(tmp_path / "manual"))
  builder = fx.build("cityscapes_semantic", tmp_path / "manual", tmp_path / "tfds")
  config = cityscapes.get_config("local")
  config.data.tfds_data_dir = str(tmp_path / "tfds")
  config.data.image_size = (16, 32)
  config.eval.batch_size = 8
  config.eval.seg_steps, config.eval.synth_steps = (1,), 1
  config.sample.seg_steps = 1
  model = SemFlow.from_config(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0))
  mesh = parallel.make_mesh(config)
  result = evaluate.Evaluator(config, model, Programs(model), builder, mesh)(params, 0)

  predictor = sample.Predictor(config, model, params)
  out = tmp_path / "predictions"
  summary = sample_many.segment_many(config, "", None, str(out), split="validation",
                                predictor=predictor)
  assert summary["written"] == 3
  predictions = sorted(str(out / "labelIds" / n) for n in os.listdir(out / "labelIds"))
  gt_by_frame = {os.path.basename(label).replace("_gtFine_labelIds.png", ""): label
                 for _, _, label, _ in written["val"]}
  truths = [gt_by_frame[os.path.basename(p).replace("_leftImg8bit.png", "")]
            for p in predictions]
  assert np.asarray(Image.open(predictions[0])).shape == (32, 64)  # native size
  args = cs_eval.args
  args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True  # pyright: ignore[reportAttributeAccessIssue]
  official = cs_eval.evaluateImgLists(predictions, truths, args)
  assert abs(result["miou_euler_1"] - official["averageScoreClasses"]) < 1e-9
  # The class-id PNGs are the same predictions in train ids.
  _, table = classes.official_format("cityscapes_semantic")  # pyright: ignore[reportGeneralTypeIssues]
  for p in predictions:
    ids = np.asarray(Image.open(p.replace("/labelIds/", "/labels/")))
    np.testing.assert_array_equal(table[ids], np.asarray(Image.open(p)))
  # Synthesis of the split: one image per mask at its native size.
  synthesized = sample_many.synthesize_many(config, "", None, str(tmp_path / "synth"), 1,
                                       split="validation", predictor=predictor)
  assert synthesized["written"] == 3
  for name in os.listdir(tmp_path / "synth"):
    assert np.asarray(Image.open(tmp_path / "synth" / name)).shape == (32, 64, 3)


def test_preview_legend_names_the_classes_in_the_mask():
  labels = np.zeros((20, 24), np.uint8)
  labels[5:, :] = 2
  labels[:3, :4] = 255
  names = ("sky", "ground", "sun")
  preview = images.preview_with_legend(labels, names)
  scale = -(-160 // 20)
  picture = images.colourise(labels).repeat(scale, 0).repeat(scale, 1)
  assert preview.shape[0] == picture.shape[0] and preview.shape[1] > picture.shape[1]
  np.testing.assert_array_equal(preview[:, :picture.shape[1]], picture)
  legend = preview[:, picture.shape[1]:]
  present = {tuple(c) for c in legend.reshape(-1, 3)}
  for value in (0, 2, 255):  # each class in the mask has its swatch, the others none
    assert tuple(images.colourise(np.array([value]))[0]) in present, value
  assert tuple(images.colourise(np.array([1]))[0]) not in present


def test_files_reach_the_model_resized_as_the_input_pipeline_resizes_a_dataset():
  """A photo given to --mode=segment and the same photo in a dataset (--mode=eval, --split)
  become the same model input: the pipeline's own tf.image resize is the reference."""
  import tensorflow as tf
  rng = np.random.default_rng(5)
  for (h, w), size in [((64, 48), (32, 32)), ((20, 28), (32, 32)), ((480, 640), (32, 48)),
                       ((5, 3), (16, 16)), ((32, 32), (32, 32))]:
    photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    labels = rng.integers(0, 20, (h, w), dtype=np.uint8)
    theirs = pipeline._resize(tf.constant(photo), size, nearest=False).numpy().astype(int)
    ours = resize.image(photo, size).astype(int)
    assert ours.shape == (*size, 3)
    # float32 sums in another order: a value may round the other way, very rarely
    assert np.abs(ours - theirs).max() <= 1 and (ours != theirs).mean() < 1e-3, (h, w)
    np.testing.assert_array_equal(
        resize.labels(labels, size),
        pipeline._resize(tf.constant(labels[..., None]), size, nearest=True).numpy()[..., 0])
