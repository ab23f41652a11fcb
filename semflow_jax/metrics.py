"""Evaluation math, no I/O: confusion matrices and mIoU, the Frechet distance, diversity, and the
colour-only classifier. Numpy in, plain Python out (None where a number is undefined, never NaN,
so every result is valid JSON).

Segmentation is scored as the literature scores it (Cityscapes' evalPixelLevelSemanticLabeling,
mmsegmentation): one confusion matrix over every pixel of the split whose label is not the ignore
label, IoU_c = TP / (TP + FP + FN) per class, and mIoU the mean over the classes that occur in the
truth or the prediction (a class absent from both has no IoU and is left out of the mean).
Predictions made at the model's resolution are first resized back to each label's native size
with nearest neighbour at pixel centres (`resize_nearest`: exact integer arithmetic; PIL's
NEAREST agrees except where a centre falls exactly on a pixel boundary, which its floating point
rounds down, e.g. 32 -> 7 columns; integer scale factors never tie).
"""

from typing import Optional

import numpy as np

IGNORE_LABEL = 255


def _check_range(values: np.ndarray, num_classes: int, what: str, ignore_label=None):
  bad = (values < 0) | (values >= num_classes)
  if ignore_label is not None:
    bad &= values != ignore_label
  if bad.any():
    found = np.unique(values[bad])[:8].tolist()
    allowed = f"0..{num_classes - 1}" + (f" or {ignore_label}" if ignore_label is not None else "")
    raise ValueError(f"{what} values {found} are outside {allowed}")


def confusion_matrix(labels, predictions, num_classes: int, mask=None,
                     ignore_label: int = IGNORE_LABEL) -> np.ndarray:
  """(num_classes, num_classes) int64 counts, rows = truth, columns = prediction.

  labels, predictions: (N, ...) of the same shape. Pixels labelled `ignore_label` and examples
  whose `mask` (N,) is 0 (padding) are left out.
  """
  labels = np.asarray(labels)
  predictions = np.asarray(predictions)
  if labels.shape != predictions.shape:
    raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
  labels = labels.reshape(len(labels), -1).astype(np.int64)
  predictions = predictions.reshape(len(predictions), -1).astype(np.int64)
  keep = labels != ignore_label
  if mask is not None:
    keep &= np.asarray(mask, bool)[:, None]
  labels, predictions = labels[keep], predictions[keep]
  _check_range(labels, num_classes, "label")
  _check_range(predictions, num_classes, "prediction")
  index = labels * num_classes + predictions
  return np.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def iou_from_confusion(confusion: np.ndarray) -> dict:
  """{'miou', 'per_class_iou' (list, None for a class absent from truth and prediction),
  'pixel_accuracy', 'num_pixels'} from a confusion matrix (rows = truth)."""
  confusion = np.asarray(confusion, np.int64)
  tp = np.diag(confusion).astype(np.float64)
  union = confusion.sum(0) + confusion.sum(1) - tp
  present = union > 0
  iou = np.divide(tp, union, out=np.zeros_like(tp), where=present)
  total = int(confusion.sum())
  return {
      "miou": float(np.mean(iou[present])) if present.any() else None,
      "per_class_iou": [float(v) if p else None for v, p in zip(iou, present)],
      "pixel_accuracy": float(tp.sum() / total) if total else None,
      "num_pixels": total,
  }


def mean_iou(pred, label, num_classes: int, ignore_label: int = IGNORE_LABEL) -> dict:
  """mIoU of predicted against true label maps: {'miou', 'per_class_iou', 'pixel_accuracy',
  'num_pixels'} (see `iou_from_confusion`).

  pred, label: integer arrays of one shape ((H, W) or (N, H, W)), or two sequences of such
  arrays (images of different sizes); each prediction must have its label's size.
  """
  if isinstance(pred, np.ndarray) or isinstance(label, np.ndarray):
    pairs = [(np.asarray(pred), np.asarray(label))]
  else:
    pairs = list(zip(pred, label, strict=True))
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for p, l in pairs:
    p, l = np.asarray(p), np.asarray(l)
    confusion += confusion_matrix(l[None], p[None], num_classes, ignore_label=ignore_label)
  return iou_from_confusion(confusion)


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """Source index of each output index when resizing `size_in` -> `size_out` with nearest
  neighbour at pixel centres: floor((i + 1/2) * size_in / size_out), in exact integers."""
  return ((2 * np.arange(size_out) + 1) * size_in) // (2 * size_out)


def resize_nearest(labels: np.ndarray, height: int, width: int) -> np.ndarray:
  """(h, w) label map -> (height, width), nearest neighbour at pixel centres."""
  labels = np.asarray(labels)
  rows = nearest_indices(labels.shape[0], height)
  cols = nearest_indices(labels.shape[1], width)
  return labels[rows[:, None], cols[None, :]]


def native_confusion(predictions, labels, sizes, num_classes: int, mask=None,
                     ignore_label: int = IGNORE_LABEL) -> np.ndarray:
  """Confusion of model-resolution predictions scored at each label's native size.

  predictions: (N, h, w) at the model's resolution; labels: (N, H, W[, 1]) native labels padded
  (with anything) to a common size; sizes: (N, 2) each label's native (height, width); examples
  with mask 0 are skipped. Each prediction is resized to its label's size with nearest neighbour.
  """
  labels = np.asarray(labels)
  if labels.ndim == 4:
    labels = labels[..., 0]
  confusion = np.zeros((num_classes, num_classes), np.int64)
  for i in range(len(predictions)):
    if mask is not None and not mask[i]:
      continue
    height, width = (int(s) for s in sizes[i])
    native = resize_nearest(predictions[i], height, width)
    confusion += confusion_matrix(labels[i, :height, :width][None], native[None], num_classes,
                                  ignore_label=ignore_label)
  return confusion


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64 (what FID reports):
  |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr((sigma1 sigma2)^(1/2)).

  tr((sigma1 sigma2)^(1/2)) is the sum of the square roots of the eigenvalues of the symmetric
  positive semi-definite sigma1^(1/2) sigma2 sigma1^(1/2) (the same eigenvalues as sigma1 sigma2),
  so it needs only symmetric eigendecompositions and stays real and finite for singular
  covariances (fewer samples than feature dimensions).
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  d = mu1.shape[0]
  if mu1.shape != (d,) or mu2.shape != (d,) or sigma1.shape != (d, d) or sigma2.shape != (d, d):
    raise ValueError(f"frechet_distance: means {mu1.shape}, {mu2.shape} and covariances "
                     f"{sigma1.shape}, {sigma2.shape} do not describe one {d}-d space")
  sigma1 = 0.5 * (sigma1 + sigma1.T)
  sigma2 = 0.5 * (sigma2 + sigma2.T)
  w, v = np.linalg.eigh(sigma1)
  root1 = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
  product = root1 @ sigma2 @ root1
  eigenvalues = np.linalg.eigvalsh(0.5 * (product + product.T))
  trace_sqrt = float(np.sum(np.sqrt(np.clip(eigenvalues, 0.0, None))))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt)


def mean_and_covariance(features) -> tuple:
  """(mean, covariance) of (N, D) features in float64, as FID statistics (rows = samples)."""
  x = np.asarray(features, np.float64)
  return x.mean(0), np.cov(x, rowvar=False)


def per_example_mean_abs_difference(a, b) -> np.ndarray:
  """(N,) mean |a - b| per example, in float64; a, b (N, ...) in [-1, 1]."""
  diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return diff.reshape(len(diff), -1).mean(1)


def mean_abs_difference(a, b, mask=None) -> float:
  """Mean |a - b| over all pixels of the (unmasked) examples; a, b in [-1, 1]."""
  per_example = per_example_mean_abs_difference(a, b)
  if mask is None:
    return float(per_example.mean())
  return float(per_example[np.asarray(mask, bool)].mean())


class ColourClassifier:
  """A Gaussian per class over pixel RGB, with class priors (quadratic discriminant analysis).

  It sees one pixel's colour and nothing else, so its mIoU is what colour alone can do: the
  floor a segmenter must beat to show it uses shape, and a realism check for synthesised colours.
  Class c scores log p(c) - (log det S_c + (x - m_c)' S_c^-1 (x - m_c)) / 2, a quadratic form in
  x: `predict` evaluates it as 10 quadratic features of x times a (10, C) matrix, a fixed number
  of pixels at a time, so memory does not grow with the image or the batch.
  """

  CHUNK_PIXELS = 1 << 15  # (CHUNK_PIXELS, C) float64 scores at a time: 44 MiB for 171 classes

  def __init__(self, means, covariances, log_priors):
    self.means, self.covariances, self.log_priors = means, covariances, log_priors
    precisions = np.linalg.inv(covariances)                        # (C, 3, 3)
    log_dets = np.linalg.slogdet(covariances)[1]
    # Coefficients of [x0^2, x1^2, x2^2, x0 x1, x0 x2, x1 x2, x0, x1, x2, 1] per class.
    i, j = np.triu_indices(3)
    quadratic = -0.5 * precisions[:, i, j] * np.where(i == j, 1.0, 2.0)
    order = [0, 3, 5, 1, 2, 4]  # triu order (00, 01, 02, 11, 12, 22) -> the feature order above
    linear = np.einsum("cij,cj->ci", precisions, means)
    constant = log_priors - 0.5 * (np.einsum("ci,ci->c", linear, means) + log_dets)
    self._weights = np.concatenate([quadratic[:, order], linear, constant[:, None]], 1).T

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
    """Images in [-1, 1] float (..., 3) or uint8 -> int64 labels (...)."""
    images = np.asarray(images)
    pixels = images.reshape(-1, 3)
    out = np.empty(len(pixels), np.int64)
    for start in range(0, len(pixels), self.CHUNK_PIXELS):
      x = pixels[start:start + self.CHUNK_PIXELS].astype(np.float64)
      if images.dtype == np.uint8:
        x = x / 127.5 - 1.0
      features = np.concatenate([x * x, x[:, [0]] * x[:, [1]], x[:, [0]] * x[:, [2]],
                                 x[:, [1]] * x[:, [2]], x, np.ones((len(x), 1))], 1)
      out[start:start + len(x)] = np.argmax(features @ self._weights, axis=1)
    return out.reshape(images.shape[:-1])


def valid_or_none(value: Optional[float]) -> Optional[float]:
  """A float, or None for a missing / non-finite value (JSON has no NaN)."""
  if value is None:
    return None
  value = float(value)
  return value if np.isfinite(value) else None



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
