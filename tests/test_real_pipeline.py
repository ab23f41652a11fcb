"""The input pipeline on the manual-download datasets (fixture-built): crops, resizing, flips,
per-process splits, padded evaluation, resume, global batches, and the dataset configs."""

import itertools
import json
import os

import jax
import numpy as np
import pytest
from cityscapesscripts.helpers import labels as cs_labels
from PIL import Image

from semflow_jax import parallel, train
from semflow_jax.semflow import SemFlow
from semflow_jax.data import pipeline
from tests import dataset_fixtures as fx

# label id -> train id from the reference package
CS_LOOKUP = np.full(256, 255, np.uint8)
for _label in cs_labels.labels:
  CS_LOOKUP[_label.id % 256] = _label.trainId if 0 <= _label.trainId < 255 else 255


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
  root = tmp_path_factory.mktemp("real")
  out = {"root": root}
  for name in ("cityscapes_semantic", "coco_stuff"):
    manual_dir = root / "manual" / name
    out[name + "_written"] = fx.WRITERS[name](str(manual_dir))
    out[name] = fx.build(name, manual_dir, root / "tfds")
    out[name + "_manual"] = str(manual_dir)
  out["tfds"] = str(root / "tfds")
  return out


def _take(it, n):
  return list(itertools.islice(it, n))


def _cityscapes_raw(fixtures):
  return {os.path.basename(image): raw
          for split in fixtures["cityscapes_semantic_written"].values()
          for _, image, _, raw in split}


def test_random_crop_and_flip_are_the_same_for_image_and_label(fixtures):
  builder = fixtures["cityscapes_semantic"]
  h, w = fx.CITYSCAPES_SIZE
  # Square crops of the 32x64 frames at 32x32: no resizing, so pixels can be traced back.
  preprocess = pipeline.Preprocess(crop="random", image_size=(h, h))
  batches = _take(pipeline.TrainIterator(builder, 6, seed=1, preprocess=preprocess), 4)
  lefts, flips = set(), 0
  for batch in batches:
    assert batch["image"].shape == (6, h, h, 3) and batch["label"].shape == (6, h, h, 1)
    for image, label in zip(batch["image"], batch["label"]):
      raw = image[..., 0] // fx.CITYSCAPES_RED_SCALE  # the fixture's image encodes its label id
      np.testing.assert_array_equal(label[..., 0], CS_LOOKUP[raw])
      xs = image[0, :, 1].astype(int)  # green = column in the original frame
      flipped = xs[0] > xs[-1]
      assert np.array_equal(np.abs(np.diff(xs)), np.ones(h - 1)), "a contiguous window"
      lefts.add(int(xs.min()))
      flips += flipped
      assert image[:, 0, 2].tolist() == list(range(h))  # full height kept
  assert len(lefts) >= 4 and 0 < flips < 24  # crops move and flips happen, not always


def test_full_frame_resize_is_bicubic_for_images_and_nearest_for_labels(fixtures):
  builder = fixtures["cityscapes_semantic"]
  raws = _cityscapes_raw(fixtures)
  preprocess = pipeline.Preprocess(crop="full", image_size=(16, 32))
  batch = _take(pipeline.TrainIterator(builder, 6, seed=0, flip=False, preprocess=preprocess,
                                        keys=("image", "label", "file_name")), 1)[0]
  for image, label, name in zip(batch["image"], batch["label"], batch["file_name"]):
    raw = raws[name.decode()]
    # Nearest with half-pixel centres: output pixel i reads input pixel 2i + 1.
    np.testing.assert_array_equal(label[..., 0], CS_LOOKUP[raw[1::2, 1::2]])
    source = os.path.join(fixtures["cityscapes_semantic_manual"], "leftImg8bit", "train",
                          name.decode().split("_")[0], name.decode())
    reference = np.asarray(Image.open(source).resize((32, 16), Image.Resampling.BICUBIC), float)
    assert np.abs(image.astype(float) - reference).mean() < 1.5  # PIL's bicubic


def test_square_crops_of_coco_never_invent_classes(fixtures):
  builder = fixtures["coco_stuff"]
  preprocess = pipeline.Preprocess(crop="random", image_size=(24, 24), crop_scale=(0.6, 1.0))
  batch = _take(pipeline.TrainIterator(builder, 4, seed=0, preprocess=preprocess), 1)[0]
  assert batch["image"].shape == (4, 24, 24, 3) and batch["image"].dtype == np.uint8
  allowed = set(fx.COCO_RAW_TO_EXPECTED.values())
  assert set(np.unique(batch["label"])) <= allowed


def test_global_batches_over_8_devices_have_the_right_shape_and_sharding(fixtures, tiny_config):
  assert jax.device_count() == 8
  mesh = parallel.make_mesh(tiny_config)
  preprocess = pipeline.Preprocess(crop="full", image_size=(16, 32))
  local = next(pipeline.TrainIterator(fixtures["cityscapes_semantic"], 8, seed=0,
                                       preprocess=preprocess))
  batch = parallel.to_global(local, mesh)
  assert batch["image"].shape == (8, 16, 32, 3) and batch["label"].shape == (8, 16, 32, 1)
  for x in batch.values():
    assert x.sharding.is_equivalent_to(parallel.batch_sharding(mesh), x.ndim)
    assert {s.data.shape[0] for s in x.addressable_shards} == {1}  # one example per device
  for key in ("image", "label"):
    np.testing.assert_array_equal(np.asarray(batch[key]), local[key])


@pytest.mark.parametrize("process_count", [2, 4])
def test_each_process_reads_its_rows_of_the_same_global_batches(fixtures, monkeypatch,
                                                                process_count):
  builder = fixtures["cityscapes_semantic"]  # 8 training examples
  total = builder.info.splits["train"].num_examples
  batches = 2 * total // process_count  # two epochs
  keys = ("file_name", "image")
  one = _take(pipeline.TrainIterator(builder, process_count, seed=0, keys=keys), batches)
  monkeypatch.setattr(jax, "process_count", lambda: process_count)
  rows = []
  for index in range(process_count):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    rows.append(_take(pipeline.TrainIterator(builder, 1, seed=0, keys=keys), batches))
  for b, global_batch in enumerate(one):  # process p holds row p of every global batch
    for key in keys:
      np.testing.assert_array_equal(np.concatenate([r[b][key] for r in rows]), global_batch[key])
  epochs = [[n.decode() for g in one[e * total // process_count:(e + 1) * total // process_count]
             for n in g["file_name"]] for e in range(2)]
  assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(fx.examples(builder, "train"))
  assert epochs[0] != epochs[1]  # reshuffled


@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_padded_evaluation_counts_every_example_once(fixtures, monkeypatch, process_count):
  builder = fixtures["coco_stuff"]  # 3 validation images of different sizes
  preprocess = pipeline.Preprocess(crop="random", image_size=(20, 20))  # eval: whole frame
  monkeypatch.setattr(jax, "process_count", lambda: process_count)
  counted, num_batches = [], set()
  for index in range(process_count):
    monkeypatch.setattr(jax, "process_index", lambda index=index: index)
    batches = list(pipeline.eval_batches(builder, "validation", 2,
                                         keys=("image", "label", "file_name"),
                                         preprocess=preprocess))
    num_batches.add(len(batches))
    for b in batches:
      assert b["image"].shape == (2, 20, 20, 3) and b["mask"].shape == (2,)
      counted += [n.decode() for n, m in zip(b["file_name"], b["mask"]) if m > 0]
  assert len(num_batches) == 1  # every process yields the same number of batches
  assert sorted(counted) == sorted(fx.examples(builder, "validation"))


def test_evaluation_resizes_the_whole_frame_with_native_labels_beside(fixtures):
  builder = fixtures["coco_stuff"]  # 40x56, 48x36, 44x44 validation images
  preprocess = pipeline.Preprocess(crop="random", image_size=(20, 20))
  a = pipeline.load_arrays(builder, "validation", 3, preprocess=preprocess)
  b = pipeline.load_arrays(builder, "validation", 3, preprocess=preprocess)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["label"].shape == (3, 20, 20, 1)
  stored = fx.examples(builder, "validation")
  batch = next(pipeline.eval_batches(builder, "validation", 4, preprocess=preprocess,
                                     keys=("image", "label", "file_name"), native_labels=True))
  assert batch[pipeline.NATIVE_LABEL_KEY].shape == (4, 48, 56, 1)  # padded to the largest
  for i, name in enumerate(batch["file_name"][:3]):
    label = stored[name.decode()]["label"]
    h, w = label.shape[:2]
    assert batch[pipeline.NATIVE_SIZE_KEY][i].tolist() == [h, w]
    np.testing.assert_array_equal(batch[pipeline.NATIVE_LABEL_KEY][i, :h, :w], label)
    assert (batch[pipeline.NATIVE_LABEL_KEY][i, h:] == 255).all()
    assert (batch[pipeline.NATIVE_LABEL_KEY][i, :, w:] == 255).all()
    # Nothing cropped: every stripe (class) of the stored label survives the resize.
    np.testing.assert_array_equal(np.unique(batch["label"][i]), np.unique(label))


def test_restored_iterator_continues_with_the_next_unseen_batch(fixtures):
  builder = fixtures["coco_stuff"]  # 4 training images, batch 2: 7 batches cross 3 epochs
  preprocess = pipeline.Preprocess(crop="random", image_size=(16, 16), crop_scale=(0.5, 1.0))
  full = _take(pipeline.TrainIterator(builder, 2, 5, preprocess=preprocess), 7)
  first = pipeline.TrainIterator(builder, 2, 5, preprocess=preprocess)
  _take(first, 3)
  state = json.loads(json.dumps(first.state()))  # as the checkpoint stores it
  resumed = pipeline.TrainIterator.from_state(builder, state, 2, 5, preprocess=preprocess)
  for a, b in zip(full[3:], _take(resumed, 4)):
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
  assert resumed.position == 7
  # Crops differ between epochs (fresh randomness), so a resume that repeated data would show.
  assert not np.array_equal(full[0]["image"], full[2]["image"])


def test_preprocess_from_config_validates_keys(tiny_config):
  assert pipeline.Preprocess.from_config(tiny_config.data) == pipeline.Preprocess()
  from configs import cityscapes
  data = cityscapes.get_config().data
  assert pipeline.Preprocess.from_config(data) == pipeline.Preprocess("full", (512, 1024))
  data.crop = "zoom"
  with pytest.raises(ValueError, match="config.data.crop='zoom'"):
    pipeline.Preprocess.from_config(data)
  data.crop, data.crop_scale = "random", (0.0, 1.0)
  with pytest.raises(ValueError, match="config.data.crop_scale"):
    pipeline.Preprocess.from_config(data)


def test_unbuilt_dataset_without_manual_dir_says_how_to_build(tmp_path):
  from configs import celebamask_hq
  config = celebamask_hq.get_config("local")
  config.data.tfds_data_dir = str(tmp_path)
  with pytest.raises(FileNotFoundError, match="python -m semflow_jax.data.build celebamask_hq --manual_dir"):
    pipeline.get_builder(config.data)


def test_dataset_configs_hold_the_reference_recipes():
  from configs import celebamask_hq, cityscapes, coco_stuff, synthetic
  expected = {coco_stuff: ("coco_stuff", (512, 512), 171, 1e-5, 320_000, "random"),
              celebamask_hq: ("celebamask_hq", (512, 512), 19, 2e-5, 80_000, "random"),
              cityscapes: ("cityscapes_semantic", (512, 1024), 19, 5e-5, 8_000, "full")}
  sections = set(synthetic.get_config().keys())
  for module, (name, size, classes, lr, steps, crop) in expected.items():
    c = module.get_config()
    assert set(c.keys()) == sections
    assert set(synthetic.get_config().model.keys()) <= set(c.model.keys())
    got = (c.data.name, c.data.image_size, c.data.num_classes, c.train.learning_rate,
           c.train.num_steps, c.data.crop)
    assert got == (name, size, classes, lr, steps, crop)
    assert c.train.batch_size == 16 * 8 and c.model.autoencoder == "sd_vae"
    assert "init_from" in c.model and c.model.unet == "sd"
    # The full recipe builds the SD-1.5 model with the dataset's size (shapes only).
    model = SemFlow.from_config(c)
    assert model.latent_shape == (size[0] // 8, size[1] // 8, 4)
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
    assert sum(x.size for x in jax.tree.leaves(shapes["unet"])) == 859_520_964
    local = module.get_config("local")
    assert local.model.autoencoder == "identity" and max(local.data.image_size) <= 64
    with pytest.raises(ValueError, match="unknown"):
      module.get_config("huge")
    # The recipes keep the paper's palette and beta = 0.1; `spread` is the variant.
    assert (model.palette.name, c.model.perturbation) == ("paper", 0.255)
    assert model.perturbation * model.palette.half_spacing == pytest.approx(0.05)
    for arg in ("spread", "local,spread"):
      variant = module.get_config(arg)
      assert variant.model.palette == "spread"
      assert variant.model.perturbation == synthetic.get_config().model.perturbation
      assert (variant.model.autoencoder == "identity") == ("local" in arg)


def test_local_cityscapes_config_trains_on_a_fixture_dataset(fixtures, tmp_path):
  from configs import cityscapes
  config = cityscapes.get_config("local")
  config.data.manual_dir = fixtures["cityscapes_semantic_manual"]
  config.data.tfds_data_dir = str(tmp_path / "tfds")  # not built yet: built from manual_dir
  config.train.num_steps = 2
  config.train.checkpoint_every = 2
  workdir = str(tmp_path / "run")
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == 2 and result["num_examples"] == 3
  assert np.isfinite(result["miou_euler_2"]) and np.isfinite(result["diversity"])
  with open(os.path.join(workdir, "checkpoints", "2", "data", "metadata")) as f:
    assert json.load(f)["position"] == 2
  assert os.path.exists(os.path.join(workdir, "samples", "segmentation_2.png"))
