import numpy as np

from semflow_jax import metrics
from semflow_jax.data import pipeline, synthetic


def test_examples_are_a_pure_function_of_seed_split_and_index():
  a = synthetic.generate_example(0, "train", 5, 32)
  b = synthetic.generate_example(0, "train", 5, 32)
  for k in ("image", "image_alt", "label"):
    np.testing.assert_array_equal(a[k], b[k])
  c = synthetic.generate_example(0, "validation", 5, 32)
  assert not np.array_equal(a["label"], c["label"])
  d = synthetic.generate_example(1, "train", 5, 32)
  assert not np.array_equal(a["label"], d["label"])


def test_shapes_dtypes_and_configurable_size():
  for size in (32, 48):
    ex = synthetic.generate_example(0, "train", 0, size)
    assert ex["image"].shape == ex["image_alt"].shape == (size, size, 3)
    assert ex["label"].shape == (size, size, 1)
    assert ex["image"].dtype == ex["label"].dtype == np.uint8


def test_layouts_use_every_class_and_two_renderings_share_a_mask_but_differ():
  examples = [synthetic.generate_example(0, "train", i, 32) for i in range(200)]
  labels = np.stack([e["label"] for e in examples])
  assert synthetic.NUM_CLASSES >= 6
  assert set(np.unique(labels)) == set(range(synthetic.NUM_CLASSES))
  # Sky over ground: the top row is mostly sky, the bottom row mostly ground or objects on it.
  assert (labels[:, 0] == synthetic.SKY).mean() > 0.6
  assert (labels[:, -1] == synthetic.SKY).mean() == 0.0
  diffs = [np.abs(e["image"].astype(int) - e["image_alt"].astype(int)).mean() for e in examples]
  assert min(diffs) > 5  # every layout gets visibly different appearances


def test_colour_alone_cannot_segment_the_scenes():
  # The classes' colours overlap, so a per-pixel colour classifier fitted on the same data
  # stays far from perfect; shape must carry the rest.
  ex = [synthetic.generate_example(0, "train", i, 32) for i in range(300)]
  images = np.stack([e["image"] for e in ex])
  labels = np.stack([e["label"] for e in ex])
  classifier = metrics.ColourClassifier.fit(images, labels, synthetic.NUM_CLASSES)
  confusion = metrics.confusion_matrix(labels[..., 0], classifier.predict(images),
                                       synthetic.NUM_CLASSES)
  assert 0.2 < metrics.iou_from_confusion(confusion)["miou"] < 0.8


def test_tfds_builder_builds_and_decodes(tiny_config):
  builder = pipeline.get_builder(tiny_config.data)
  assert builder.info.splits["train"].num_examples == tiny_config.data.num_train
  assert builder.info.splits["validation"].num_examples == tiny_config.data.num_validation
  arrays = pipeline.load_arrays(builder, "validation", 4,
                                keys=("image", "image_alt", "label", "file_name"))
  size = tiny_config.data.image_size
  assert arrays["image"].shape == (4, size, size, 3)
  assert arrays["label"].shape == (4, size, size, 1)
  # Stored examples are exactly what the generator makes.
  ref = synthetic.generate_example(tiny_config.data.seed, "validation", 2, size)
  np.testing.assert_array_equal(arrays["image"][2], ref["image"])
  np.testing.assert_array_equal(arrays["label"][2], ref["label"])
  assert arrays["file_name"][2].decode() == "validation_000002"
