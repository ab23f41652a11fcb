"""Evaluation math, no I/O: confusion matrices and mIoU, the Frechet distance, diversity (also
after downsampling), high-frequency energy, and the colour-only classifier. Numpy in, plain
Python out (None where a number is undefined, never NaN, so every result is valid JSON; `plain`
makes a whole result so).

Segmentation is scored as the literature scores it (Cityscapes' evalPixelLevelSemanticLabeling,
mmsegmentation): one confusion matrix over every pixel of the split whose label is not the ignore
label, IoU_c = TP / (TP + FP + FN) per class, and mIoU the mean over the classes that occur in the
truth or the prediction (a class absent from both has no IoU and is left out of the mean).
Predictions made at the model's resolution are first resized back to each label's native size
with nearest neighbour at pixel centres (`resize.labels`: exact integer arithmetic).
"""

from typing import Optional

import numpy as np

from semflow_jax import resize

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
    native = resize.labels(predictions[i], (height, width))
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


def _per_example_mean(x: np.ndarray) -> np.ndarray:
  return x.reshape(len(x), int(np.prod(x.shape[1:]))).mean(1)  # (0, ...) -> (0,)


def per_example_mean_abs_difference(a, b) -> np.ndarray:
  """(N,) mean |a - b| per example, in float64; a, b (N, ...) in [-1, 1]."""
  diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
  return _per_example_mean(diff)


def average_pool(images, factor: int) -> np.ndarray:
  """(N, H, W, C) -> (N, H // factor, W // factor, C) float64: the mean of each factor x factor
  block (rows and columns past the last whole block are left out)."""
  x = np.asarray(images, np.float64)
  n, h, w, c = x.shape
  h, w = h // factor * factor, w // factor * factor
  if not h or not w:
    raise ValueError(f"images of {x.shape[1:3]} have no whole {factor}x{factor} block")
  x = x[:, :h, :w].reshape(n, h // factor, factor, w // factor, factor, c)
  return x.mean((2, 4))


def per_example_downsampled_difference(a, b, factor: int = 4) -> np.ndarray:
  """(N,) mean |a - b| per example after `factor` x `factor` average pooling of both; a, b
  (N, H, W, C) in [-1, 1]. Differences finer than the blocks (pixel noise) average out, so this
  is diversity at the scale of objects and colours."""
  return per_example_mean_abs_difference(average_pool(a, factor), average_pool(b, factor))


def box3(images) -> np.ndarray:
  """(N, H, W, C) -> the 3x3 mean of each pixel's neighbourhood per channel, edges replicated."""
  x = np.asarray(images, np.float64)
  padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = x.shape[1:3]
  return sum(padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)) / 9.0


def high_frequency_energy(images) -> np.ndarray:
  """(N,) per example: the mean over pixels and channels of (x - box3(x))^2, images (N, H, W, C)
  in [-1, 1]. Pixel noise and sharp edges raise it; a blurry image has little."""
  x = np.asarray(images, np.float64)
  return _per_example_mean((x - box3(x)) ** 2)


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


def plain(obj):
  """A result as plain Python for strict JSON: numpy numbers become int / float, non-finite
  floats None, tuples lists (dicts and lists recursively)."""
  if isinstance(obj, dict):
    return {k: plain(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [plain(v) for v in obj]
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return valid_or_none(obj)
  return obj
