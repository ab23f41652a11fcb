"""Evaluation math, no I/O: confusion matrices, mIoU, diversity, the colour-only classifier."""

import numpy as np

from semflow_jax.anchors import IGNORE_LABEL


def confusion_matrix(labels, predictions, num_classes: int, mask=None) -> np.ndarray:
  """(num_classes, num_classes) counts, rows = truth; ignore-label pixels and masked examples
  (mask 0 per example) are left out."""
  labels = np.asarray(labels).reshape(len(labels), -1).astype(np.int64)
  predictions = np.asarray(predictions).reshape(len(predictions), -1).astype(np.int64)
  keep = labels != IGNORE_LABEL
  if mask is not None:
    keep &= np.asarray(mask, bool)[:, None]
  index = labels[keep] * num_classes + predictions[keep]
  return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(confusion: np.ndarray) -> float:
  """Mean over classes that occur in truth or prediction of TP / (TP + FP + FN)."""
  tp = np.diag(confusion).astype(np.float64)
  union = confusion.sum(0) + confusion.sum(1) - tp
  present = union > 0
  return float(np.mean(tp[present] / union[present])) if present.any() else float("nan")


def per_class_iou(confusion: np.ndarray) -> np.ndarray:
  tp = np.diag(confusion).astype(np.float64)
  union = confusion.sum(0) + confusion.sum(1) - tp
  with np.errstate(invalid="ignore", divide="ignore"):
    return tp / union


def mean_abs_difference(a, b, mask=None) -> float:
  """Mean |a - b| over all pixels of the (unmasked) examples; a, b in [-1, 1]."""
  diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  per_example = diff.reshape(len(diff), -1).mean(1)
  if mask is None:
    return float(per_example.mean())
  mask = np.asarray(mask, bool)
  return float(per_example[mask].mean())


class ColourClassifier:
  """A Gaussian per class over pixel RGB, with class priors (quadratic discriminant analysis).

  It sees one pixel's colour and nothing else, so its mIoU is what colour alone can do: the
  floor a segmenter must beat to show it uses shape, and a realism check for synthesised colours.
  """

  def __init__(self, means, covariances, log_priors):
    self.means, self.covariances, self.log_priors = means, covariances, log_priors
    self._precisions = np.linalg.inv(covariances)
    self._log_dets = np.linalg.slogdet(covariances)[1]

  @classmethod
  def fit(cls, images, labels, num_classes: int, ridge: float = 1e-4) -> "ColourClassifier":
    """images uint8 (N, H, W, 3), labels (N, H, W[, 1]); ignore pixels are skipped."""
    x = np.asarray(images, np.float64).reshape(-1, 3) / 127.5 - 1.0
    y = np.asarray(labels).reshape(-1)
    means = np.zeros((num_classes, 3))
    covariances = np.tile(np.eye(3), (num_classes, 1, 1))
    counts = np.zeros(num_classes)
    for c in range(num_classes):
      xc = x[y == c]
      counts[c] = len(xc)
      if len(xc) >= 2:
        means[c] = xc.mean(0)
        covariances[c] = np.cov(xc, rowvar=False) + ridge * np.eye(3)
    with np.errstate(divide="ignore"):
      log_priors = np.log(counts / counts.sum())
    return cls(means, covariances, log_priors)

  def predict(self, images) -> np.ndarray:
    """Images in [-1, 1] float (..., 3) or uint8 -> labels (...)."""
    images = np.asarray(images)
    x = images.astype(np.float64) / 127.5 - 1.0 if images.dtype == np.uint8 else \
        images.astype(np.float64)
    d = x[..., None, :] - self.means                                   # (..., C, 3)
    mahalanobis = np.einsum("...ci,cij,...cj->...c", d, self._precisions, d)
    scores = self.log_priors - 0.5 * (mahalanobis + self._log_dets)
    return np.argmax(scores, axis=-1)
