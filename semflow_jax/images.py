"""Images for people: label previews, the evaluation's sample grids, PNG files (local or gs://)."""

import colorsys
import io

import numpy as np
from PIL import Image

from semflow_jax import storage


def preview_palette(num_colours: int = 256) -> np.ndarray:
  """Distinct, bright colours for looking at label maps (the anchors are too dark to read)."""
  colours = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.55 + 0.4 * ((i * 7) % 3) / 2)
             for i in range(num_colours)]
  table = np.round(np.asarray(colours) * 255).astype(np.uint8)
  table[255] = 0  # ignore: black
  return table


def colourise(labels) -> np.ndarray:
  """int labels (..., H, W) -> uint8 (..., H, W, 3) preview."""
  return preview_palette()[np.asarray(labels).astype(np.int64) % 256]


def grid(columns, pad: int = 1) -> np.ndarray:
  """A list of uint8 (N, H, W, 3) arrays -> one (N rows x len(columns)) uint8 image."""
  n, h, w, _ = columns[0].shape
  out = np.full((n * (h + pad) + pad, len(columns) * (w + pad) + pad, 3), 255, np.uint8)
  for j, col in enumerate(columns):
    for i in range(n):
      y, x = pad + i * (h + pad), pad + j * (w + pad)
      out[y:y + h, x:x + w] = col[i]
  return out


def write_png(path: str, array: np.ndarray) -> None:
  """Write a PNG (local or bucket path) atomically: never half a file under its final name."""
  buffer = io.BytesIO()
  Image.fromarray(array).save(buffer, format="PNG")
  storage.write_bytes(path, buffer.getvalue())


def segmentation_grid(image, label, prediction) -> np.ndarray:
  """One row per example: the image, its true labels, the predicted labels (previews)."""
  return grid([image, colourise(label), colourise(prediction)])


def synthesis_grid(anchors, a, b, image, alt=None) -> np.ndarray:
  """One row per mask: the perturbed anchor image synthesis a started from (the model's palette
  and perturbation, as the model sees them), syntheses a and b, the real image, and the second
  real rendering where the dataset has one. All uint8 (N, H, W, 3)."""
  return grid([anchors, a, b, image] + ([alt] if alt is not None else []))
