import numpy as np

from semflow_jax import metrics


def test_miou_by_hand_with_ignore_and_masked_examples():
  labels = np.array([[[0, 0], [1, 255]], [[1, 1], [1, 1]]])
  preds = np.array([[[0, 1], [1, 0]], [[0, 0], [0, 0]]])
  conf = metrics.confusion_matrix(labels, preds, 2, mask=np.array([1.0, 0.0]))
  # Example 2 is padding, the 255 pixel is ignored: truth (0, 0, 1), prediction (0, 1, 1).
  np.testing.assert_array_equal(conf, [[1, 1], [0, 1]])
  np.testing.assert_allclose(metrics.per_class_iou(conf), [0.5, 0.5])
  assert metrics.mean_iou(conf) == 0.5


def test_miou_skips_classes_absent_from_truth_and_prediction():
  conf = np.zeros((4, 4), np.int64)
  conf[0, 0], conf[1, 1] = 10, 5
  assert metrics.mean_iou(conf) == 1.0


def test_mean_abs_difference_respects_the_mask():
  a = np.zeros((2, 4, 4, 3))
  b = np.stack([np.full((4, 4, 3), 0.5), np.full((4, 4, 3), 2.0)])
  assert metrics.mean_abs_difference(a, b) == 1.25
  assert metrics.mean_abs_difference(a, b, mask=np.array([1, 0])) == 0.5


def test_colour_classifier_separates_separable_colours_and_uses_priors():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, (20, 8, 8))
  centres = np.array([[40, 40, 40], [200, 40, 40], [40, 200, 200]])
  images = np.clip(centres[labels] + rng.normal(0, 8, (20, 8, 8, 3)), 0, 255).astype(np.uint8)
  clf = metrics.ColourClassifier.fit(images, labels, 3)
  np.testing.assert_array_equal(clf.predict(images), labels)
  np.testing.assert_allclose(clf.means, centres / 127.5 - 1, atol=0.02)
  # Float images in [-1, 1] give the same answer as uint8.
  np.testing.assert_array_equal(clf.predict(images / 127.5 - 1.0), labels)
