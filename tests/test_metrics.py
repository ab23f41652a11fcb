import fractions
import os

import numpy as np
import pytest
import scipy.linalg
import scipy.ndimage
import scipy.stats
from PIL import Image

from semflow_jax import metrics, resize


def test_miou_by_hand_with_ignore_and_masked_examples():
  labels = np.array([[[0, 0], [1, 255]], [[1, 1], [1, 1]]])
  preds = np.array([[[0, 1], [1, 0]], [[0, 0], [0, 0]]])
  conf = metrics.confusion_matrix(labels, preds, 2, mask=np.array([1.0, 0.0]))
  # Example 2 is padding, the 255 pixel is ignored: truth (0, 0, 1), prediction (0, 1, 1).
  np.testing.assert_array_equal(conf, [[1, 1], [0, 1]])
  result = metrics.iou_from_confusion(conf)
  assert result == {"miou": 0.5, "per_class_iou": [0.5, 0.5], "pixel_accuracy": 2 / 3,
                    "num_pixels": 3}


def test_classes_absent_from_truth_and_prediction_are_none_and_left_out():
  conf = np.zeros((4, 4), np.int64)
  conf[0, 0], conf[1, 1], conf[1, 2] = 10, 5, 5
  result = metrics.iou_from_confusion(conf)
  assert result["per_class_iou"] == [1.0, 0.5, 0.0, None]
  assert result["miou"] == pytest.approx(0.5)
  empty = metrics.iou_from_confusion(np.zeros((3, 3), np.int64))
  assert empty["miou"] is None and empty["per_class_iou"] == [None] * 3


def _miou(preds, labels, num_classes):
  """mIoU of prediction / label maps of any sizes through the public functions: one confusion
  matrix summed over the images."""
  confusion = sum(metrics.confusion_matrix(np.asarray(l)[None], np.asarray(p)[None], num_classes)
                  for p, l in zip(preds, labels, strict=True))
  return metrics.iou_from_confusion(confusion)


def test_out_of_range_values_are_refused():
  with pytest.raises(ValueError, match=r"prediction values \[7\] are outside 0..4"):
    metrics.confusion_matrix(np.array([[1, 2]]), np.array([[1, 7]]), 5)
  with pytest.raises(ValueError, match=r"label values \[9\]"):
    metrics.confusion_matrix(np.array([[9, 2]]), np.array([[1, 2]]), 5)


def _reference_miou(preds, labels, num_classes, ignore=255):
  """Per class, from pixel sets: an implementation that shares nothing with metrics.py."""
  p = np.concatenate([np.ravel(x) for x in preds])
  l = np.concatenate([np.ravel(x) for x in labels])
  valid = l != ignore
  ious = {}
  for c in range(num_classes):
    tp = np.count_nonzero((p == c) & (l == c) & valid)
    fp = np.count_nonzero((p == c) & (l != c) & valid)
    fn = np.count_nonzero((p != c) & (l == c) & valid)
    if tp + fp + fn:
      ious[c] = tp / (tp + fp + fn)
  return sum(ious.values()) / len(ious), ious


def test_miou_matches_an_independent_reference_on_images_of_different_sizes():
  rng = np.random.default_rng(0)
  num_classes = 12
  labels, preds = [], []
  for h, w in ((48, 64), (30, 30), (17, 41)):
    label = rng.integers(0, num_classes - 2, (h, w))  # classes 10, 11 never in the truth
    label[rng.random((h, w)) < 0.1] = 255
    pred = np.where(rng.random((h, w)) < 0.6, label % num_classes, rng.integers(0, 11, (h, w)))
    labels.append(label.astype(np.uint8))
    preds.append(pred.astype(np.int32))
  result = _miou(preds, labels, num_classes)
  expected, per_class = _reference_miou(preds, labels, num_classes)
  assert abs(result["miou"] - expected) < 1e-12
  for c in range(num_classes):
    if c in per_class:
      assert abs(result["per_class_iou"][c] - per_class[c]) < 1e-12
    else:
      assert result["per_class_iou"][c] is None
  # One call on a stack gives the same as the sum over its images.
  stacked = metrics.confusion_matrix(np.stack(labels[:1] * 2), np.stack(preds[:1] * 2),
                                     num_classes)
  assert metrics.iou_from_confusion(stacked)["miou"] == _miou(preds[:1], labels[:1],
                                                              num_classes)["miou"]


def test_nearest_resize_uses_pixel_centres_exactly():
  rng = np.random.default_rng(1)
  x = rng.integers(0, 250, (32, 64)).astype(np.uint8)
  # Integer factors (Cityscapes 2048x1024 from a model at 1024x512, ...): identical to PIL.
  for h, w in ((1024, 2048), (64, 128), (96, 64)):
    np.testing.assert_array_equal(resize.labels(x, (h, w)),
                                  np.asarray(Image.fromarray(x).resize((w, h), Image.Resampling.NEAREST)))
  # Any size: the source pixel is the one containing the output pixel's centre, exactly.
  for size_in, size_out in ((32, 7), (512, 480), (64, 427), (5, 5)):
    expected = [int(fractions.Fraction(2 * i + 1, 2) * fractions.Fraction(size_in, size_out))
                for i in range(size_out)]
    assert resize.nearest_indices(size_in, size_out).tolist() == expected


def test_native_confusion_scores_each_label_at_its_own_size():
  rng = np.random.default_rng(2)
  preds = rng.integers(0, 5, (2, 8, 8))
  sizes = np.array([[16, 24], [8, 8]])
  labels = np.full((2, 16, 24), 0, np.uint8)  # padding must not be read
  labels[0] = rng.integers(0, 5, (16, 24))
  labels[1, :8, :8] = rng.integers(0, 5, (8, 8))
  labels[1, 8:, :] = 3
  labels[1, :, 8:] = 3
  confusion = metrics.native_confusion(preds, labels[..., None], sizes, 5, mask=np.array([1, 1]))
  up = resize.labels(preds[0], (16, 24))
  expected = metrics.confusion_matrix(labels[:1], up[None], 5) + \
      metrics.confusion_matrix(labels[1:, :8, :8], preds[1:], 5)
  np.testing.assert_array_equal(confusion, expected)
  masked = metrics.native_confusion(preds, labels, sizes, 5, mask=np.array([1, 0]))
  np.testing.assert_array_equal(masked, metrics.confusion_matrix(labels[:1], up[None], 5))


def test_miou_equals_cityscapes_official_pixel_level_evaluation_at_native_size(tmp_path):
  """Predictions at a model's 32x64 resized to Cityscapes' 2048x1024 and scored by
  cityscapesscripts' evalPixelLevelSemanticLabeling from label-id PNG files."""
  from cityscapesscripts.evaluation import evalPixelLevelSemanticLabeling as cs_eval
  from cityscapesscripts.helpers import labels as cs_labels
  train_to_id = {l.trainId: l.id for l in cs_labels.labels if 0 <= l.trainId < 255}
  to_label_id = np.zeros(256, np.uint8)
  for train_id, label_id in train_to_id.items():
    to_label_id[train_id] = label_id
  id_to_train = np.full(256, 255, np.uint8)
  for l in cs_labels.labels:
    if l.id >= 0:
      id_to_train[l.id] = l.trainId if 0 <= l.trainId < 255 else 255

  rng = np.random.default_rng(3)
  gt_files, pred_files, preds_native, truths = [], [], [], []
  for i in range(2):
    # Ground truth: blocks of label ids 0..33 (ignored ids included), at native size.
    blocks = rng.integers(0, 34, (16, 32)).astype(np.uint8)
    gt = np.kron(blocks, np.ones((64, 64), np.uint8))
    gt[rng.random(gt.shape) < 0.01] = 7  # speckles of road
    small = id_to_train[blocks[::1, ::1]]
    # The "model" output at 32x64: mostly right, some classes swapped, train ids 0..18.
    pred_small = np.where(small == 255, rng.integers(0, 19, small.shape), small)
    pred_small = np.kron(pred_small, np.ones((2, 2), np.int64))
    flip = rng.random(pred_small.shape) < 0.3
    pred_small[flip] = rng.integers(0, 19, flip.sum())
    native = resize.labels(pred_small, (1024, 2048))
    city = "frankfurt"
    stem = f"{city}_000000_{i:06d}"
    gt_path = tmp_path / "gtFine" / "val" / city / f"{stem}_gtFine_labelIds.png"
    pred_path = tmp_path / "pred" / f"{stem}_pred.png"
    for path, array in ((gt_path, gt), (pred_path, to_label_id[native])):
      os.makedirs(path.parent, exist_ok=True)
      Image.fromarray(array).save(path)
    gt_files.append(str(gt_path))
    pred_files.append(str(pred_path))
    preds_native.append(native)
    truths.append(id_to_train[gt])

  args = cs_eval.args
  args.evalInstLevelScore, args.JSONOutput, args.quiet = False, False, True  # pyright: ignore[reportAttributeAccessIssue]
  official = cs_eval.evaluateImgLists(pred_files, gt_files, args)
  ours = _miou(preds_native, truths, 19)
  assert abs(ours["miou"] - official["averageScoreClasses"]) < 1e-9
  names = [next(l.name for l in cs_labels.labels if l.trainId == t) for t in range(19)]
  for t, name in enumerate(names):
    theirs = official["classScores"][name]
    if np.isnan(theirs):
      assert ours["per_class_iou"][t] is None
    else:
      assert abs(ours["per_class_iou"][t] - theirs) < 1e-9
  # The same through the evaluation path: model-size predictions and padded native labels.
  padded = np.full((2, 1024, 2048, 1), 255, np.uint8)
  padded[..., 0] = np.stack(truths)
  small = np.stack([p[16::32, 16::32] for p in preds_native])
  confusion = metrics.native_confusion(small, padded, [(1024, 2048)] * 2, 19)
  assert abs(metrics.iou_from_confusion(confusion)["miou"] - official["averageScoreClasses"]) < 1e-9


def test_frechet_distance_matches_scipy_sqrtm_in_float64():
  rng = np.random.default_rng(4)
  d = 64
  a, b = rng.normal(size=(200, d)), rng.normal(size=(300, d)) @ rng.normal(size=(d, d)) * 0.3
  mu1, sigma1 = a.mean(0), np.cov(a, rowvar=False)
  mu2, sigma2 = b.mean(0) + 0.5, np.cov(b, rowvar=False)
  # pytorch-fid's formula with scipy's general matrix square root.
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2).real  # pyright: ignore[reportAttributeAccessIssue]
  expected = ((mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2)
              - 2 * np.trace(covmean))
  ours = metrics.frechet_distance(mu1, sigma1, mu2, sigma2)
  assert isinstance(ours, float)
  assert abs(ours - expected) <= 1e-6 * abs(expected)
  assert abs(metrics.frechet_distance(mu1, sigma1, mu1, sigma1)) < 1e-8 * np.trace(sigma1)
  # Float32 statistics are promoted: the answer is the float64 one.
  assert abs(metrics.frechet_distance(mu1.astype(np.float32), sigma1.astype(np.float32), mu2,
                                      sigma2) - expected) < 1e-3 * abs(expected)
  with pytest.raises(ValueError, match="one 64-d space"):
    metrics.frechet_distance(mu1, sigma1, mu2[:10], sigma2)


def test_per_example_mean_abs_difference_and_empty_batches():
  a = np.zeros((2, 4, 4, 3))
  b = np.stack([np.full((4, 4, 3), 0.5), np.full((4, 4, 3), 2.0)])
  np.testing.assert_array_equal(metrics.per_example_mean_abs_difference(a, b), [0.5, 2.0])
  # A process whose batch is all padding scores no example.
  assert metrics.per_example_mean_abs_difference(a[:0], b[:0]).shape == (0,)
  assert metrics.high_frequency_energy(a[:0]).shape == (0,)


def test_high_frequency_energy_against_scipy_uniform_filter():
  rng = np.random.default_rng(6)
  x = np.tanh(rng.normal(size=(3, 9, 14, 3)))  # odd sizes: every edge case of the padding
  # scipy's 3x3 mean filter, edges replicated ('nearest'), per image and channel.
  box = scipy.ndimage.uniform_filter(x, size=(1, 3, 3, 1), mode="nearest")
  expected = ((x - box) ** 2).mean((1, 2, 3))
  np.testing.assert_allclose(metrics.high_frequency_energy(x), expected, rtol=1e-12)
  flat = np.full((1, 5, 5, 3), 0.3)  # no detail, no energy; a checkerboard, a lot
  assert metrics.high_frequency_energy(flat)[0] < 1e-30
  checker = np.where((np.arange(6)[:, None] + np.arange(6)) % 2, 1.0, -1.0)
  assert metrics.high_frequency_energy(np.repeat(checker[None, ..., None], 3, -1))[0] > 0.5


def test_downsampled_difference_against_torch_average_pooling():
  import torch
  rng = np.random.default_rng(7)
  a, b = rng.uniform(-1, 1, size=(2, 4, 18, 13, 3))  # 18x13: the last rows/columns left out
  pool = lambda x: torch.nn.functional.avg_pool2d(
      torch.from_numpy(x).permute(0, 3, 1, 2), kernel_size=4).permute(0, 2, 3, 1).numpy()
  expected = np.abs(pool(a) - pool(b)).mean((1, 2, 3))
  np.testing.assert_allclose(metrics.per_example_downsampled_difference(a, b), expected,
                             rtol=1e-12)
  # Pixel noise averages out: it raises the plain difference far more than the pooled one.
  noise = rng.uniform(-0.5, 0.5, size=a.shape)
  plain = metrics.per_example_mean_abs_difference(a, a + noise).mean()
  assert metrics.per_example_downsampled_difference(a, a + noise).mean() < plain / 3
  with pytest.raises(ValueError, match="no whole 4x4 block"):
    metrics.per_example_downsampled_difference(a[:, :3], b[:, :3])


def test_plain_results_are_strict_json():
  import json
  result = metrics.plain({"a": np.float32(0.5), "b": np.nan, "c": [np.int64(3), float("inf")],
                          "d": (np.bool_(True), None), "e": {"f": np.float64(-np.inf)}})
  assert result == {"a": 0.5, "b": None, "c": [3, None], "d": [True, None], "e": {"f": None}}
  assert type(result["a"]) is float and type(result["c"][0]) is int  # pyright: ignore[reportCallIssue]
  json.dumps(result, allow_nan=False)


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


def test_colour_classifier_is_the_gaussian_posterior_argmax_in_chunks(monkeypatch):
  rng = np.random.default_rng(5)
  num_classes = 6
  labels = rng.integers(0, num_classes - 1, (6, 16, 16))  # the last class never seen: prior 0
  centres = rng.integers(30, 220, (num_classes, 3))
  images = np.clip(centres[labels] + rng.normal(0, 40, (6, 16, 16, 3)), 0, 255).astype(np.uint8)
  clf = metrics.ColourClassifier.fit(images, labels, num_classes)
  monkeypatch.setattr(metrics.ColourClassifier, "CHUNK_PIXELS", 100)  # many uneven chunks
  x = images.reshape(-1, 3) / 127.5 - 1.0
  with np.errstate(divide="ignore"):
    scores = np.stack([scipy.stats.multivariate_normal(clf.means[c], clf.covariances[c]).logpdf(x)
                       + clf.log_priors[c] for c in range(num_classes)], -1)
  expected = np.argmax(scores, -1).reshape(labels.shape)
  np.testing.assert_array_equal(clf.predict(images), expected)
  assert (expected == labels).mean() > 0.3 and (expected != labels).any()  # a real test case
