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


# -- controls (benchmarks/controls.py): preservation, style, re-sampling -----------------------
def dilate(mask, radius: int) -> np.ndarray:
  """bool (B, H, W) mask grown by `radius` pixels (a (2r + 1)^2 square)."""
  mask = np.asarray(mask, bool)
  padded = np.pad(mask, ((0, 0), (radius, radius), (radius, radius)))
  h, w = mask.shape[1:]
  out = np.zeros_like(mask)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      out |= padded[:, dy:dy + h, dx:dx + w]
  return out


def psnr(a, b, where=None) -> float:
  """PSNR in dB between uint8 images (B, H, W, 3) over the pixels where `where` (B, H, W) is
  True, from their pooled squared error; inf when they are identical there."""
  err = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
  err = err.mean(-1) if where is None else err.mean(-1)[np.asarray(where, bool)]
  mse = float(err.mean()) if err.size else 0.0
  return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def colour_histogram_distance(a, b, bins: int = 4) -> float:
  """Mean over image pairs of the total-variation distance (0 = same, 1 = disjoint) between
  the joint RGB histograms (bins^3 cells) of uint8 images a[i] and b[i]."""
  def histograms(x):
    cells = (np.asarray(x, np.int64) * bins) // 256
    index = (cells[..., 0] * bins + cells[..., 1]) * bins + cells[..., 2]
    index = index.reshape(len(index), -1)
    counts = np.stack([np.bincount(row, minlength=bins**3) for row in index])
    return counts / counts.sum(1, keepdims=True)
  return float(0.5 * np.abs(histograms(a) - histograms(b)).sum(1).mean())


def class_mean_colour_distance(a, labels_a, b, labels_b, num_classes: int) -> float:
  """Mean CIE76 Delta E (Lab, D65) between the mean colour of class c in a[i] and in b[i], over
  every (i, c) where c occurs in both label maps; uint8 images, (B, H, W) labels."""
  from semflow_jax import colour  # jnp; only this metric needs it
  lab_a = np.asarray(colour.rgb_to_lab(np.asarray(a) / 255.0), np.float64)
  lab_b = np.asarray(colour.rgb_to_lab(np.asarray(b) / 255.0), np.float64)
  distances = []
  for i in range(len(lab_a)):
    for c in range(num_classes):
      in_a, in_b = labels_a[i] == c, labels_b[i] == c
      if in_a.any() and in_b.any():
        distances.append(np.linalg.norm(lab_a[i][in_a].mean(0) - lab_b[i][in_b].mean(0)))
  return float(np.mean(distances)) if distances else float("nan")
