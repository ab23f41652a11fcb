"""Resizing on the host, one function per purpose (numpy in, numpy out, no I/O).

- `image`: a photo to a size, antialiased bicubic. What the input pipeline does to a dataset's
  images (`tf.image.resize(method='bicubic', antialias=True)` inside its TensorFlow graph,
  `data/pipeline.py`), written in numpy so that a photo given to the file CLI or the studio
  reaches the model as the same photo in a dataset does (tested equal), and so that samples go
  back to their label map's size the same way.
- `labels`: a label map to a size, nearest neighbour at pixel centres in exact integer
  arithmetic. What the pipeline does to a dataset's labels (`tf.image.resize(method='nearest')`,
  tested equal) and how evaluation scores a model-resolution prediction at a label's native size
  (PIL's NEAREST agrees except where a centre falls exactly on a pixel boundary, which its
  floating point rounds down, e.g. 32 -> 7 columns; integer scale factors never tie).
- `region`: a boolean region to a size such that an output pixel is in the region if any input
  pixel under it is (an edit at a photo's size never vanishes at the model's).
"""

from typing import Sequence

import numpy as np
from PIL import Image


def _cubic_weights(size_in: int, size_out: int) -> np.ndarray:
  """float32 (size_in, size_out): the weights along one axis of an antialiased bicubic resize
  (Keys' kernel, a = -0.5, widened by the reduction factor when shrinking), normalised per
  output pixel, as TensorFlow's scale_and_translate (and jax.image.resize) computes them."""
  scale = np.float32(size_out / size_in)
  sample = (np.arange(size_out, dtype=np.float32) + 0.5) / scale - 0.5
  x = np.abs(sample[None, :] - np.arange(size_in, dtype=np.float32)[:, None])
  x = x / max(np.float32(1.0) / scale, np.float32(1.0))
  near = ((1.5 * x - 2.5) * x) * x + 1.0
  far = ((-0.5 * x + 2.5) * x - 4.0) * x + 2.0
  weights = np.where(x >= 2.0, 0.0, np.where(x >= 1.0, far, near)).astype(np.float32)
  total = weights.sum(0, keepdims=True)
  return np.where(np.abs(total) > 1000 * np.finfo(np.float32).eps,
                  weights / np.where(total != 0, total, 1), 0).astype(np.float32)


def image(photo: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Resize a photo as the input pipeline does.

  Args:
    photo: uint8 (H, W, C).
    size: (height, width) of the result.

  Returns:
    uint8 (size[0], size[1], C): antialiased bicubic, rounded (the photo itself if already
    that size).
  """
  photo = np.asarray(photo, np.uint8)
  height, width = int(size[0]), int(size[1])
  if photo.shape[:2] == (height, width):
    return photo
  rows = _cubic_weights(photo.shape[0], height)
  cols = _cubic_weights(photo.shape[1], width)
  out = np.einsum("hwc,hy,wx->yxc", photo.astype(np.float32), rows, cols, optimize=True)
  return np.clip(np.round(out), 0, 255).astype(np.uint8)


def nearest_indices(size_in: int, size_out: int) -> np.ndarray:
  """Source index of each output index when resizing `size_in` -> `size_out` with nearest
  neighbour at pixel centres: floor((i + 1/2) * size_in / size_out), in exact integers."""
  return ((2 * np.arange(size_out) + 1) * size_in) // (2 * size_out)


def labels(label_map: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Resize a label map (or any integer map) with nearest neighbour at pixel centres.

  Args:
    label_map: (h, w) class ids, any integer dtype.
    size: (height, width) of the result.

  Returns:
    (size[0], size[1]) of the same dtype (the map itself if already that size).
  """
  label_map = np.asarray(label_map)
  height, width = int(size[0]), int(size[1])
  if label_map.shape[:2] == (height, width):
    return label_map
  rows = nearest_indices(label_map.shape[0], height)
  cols = nearest_indices(label_map.shape[1], width)
  return label_map[rows[:, None], cols[None, :]]


def region(mask: np.ndarray, size: Sequence[int]) -> np.ndarray:
  """Resize a boolean (H, W) region to bool (size[0], size[1]): a pixel is in the result if any
  pixel under it (box filter) is in `mask`."""
  mask = np.asarray(mask, bool)
  height, width = int(size[0]), int(size[1])
  if mask.shape == (height, width):
    return mask
  box = Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.BOX)
  return np.asarray(box) > 0
