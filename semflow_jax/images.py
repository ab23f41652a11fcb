"""Images for people: label previews, the evaluation's sample grids, PNG files (local or gs://)."""

import colorsys
import io

import numpy as np
from PIL import Image

from semflow_jax import storage

# Image files read as photos (folders of inputs, the folder dataset's images/).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


def preview_palette(num_colours: int = 256) -> np.ndarray:
  """Distinct, bright colours for looking at label maps (the anchors are too dark to read)."""
  colours = [colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.75, 0.55 + 0.4 * ((i * 7) % 3) / 2)
             for i in range(num_colours)]
  table = np.round(np.asarray(colours) * 255).astype(np.uint8)
  table[255] = 0  # ignore: black
  return table


def colourise(labels, colours=None) -> np.ndarray:
  """int labels (..., H, W) -> uint8 (..., H, W, 3) preview; `colours` (K, 3) replace the first
  K preview colours (a dataset's own, e.g. a folder dataset's classes.json)."""
  table = preview_palette()
  if colours is not None:
    table[:len(colours)] = np.asarray(colours, np.uint8)
  return table[np.asarray(labels).astype(np.int64) % 256]


def preview_with_legend(labels, names, colours=None, min_side: int = 160) -> np.ndarray:
  """A label map (H, W) as a preview a person can read: the colourised map (enlarged by an
  integer factor to at least `min_side` pixels on its shorter side) beside a legend of the
  classes it contains, '<id> <name>' on each class's colour (255: 'ignore')."""
  from PIL import ImageDraw, ImageFont
  labels = np.asarray(labels)
  scale = max(1, -(-min_side // max(1, min(labels.shape))))
  picture = colourise(labels, colours).repeat(scale, 0).repeat(scale, 1)
  present = [int(v) for v in np.unique(labels)]
  entries = [(v, f"{v} {names[v] if v < len(names) else 'ignore' if v == 255 else '?'}")
             for v in present]
  font = ImageFont.load_default(size=12)
  line, pad, swatch = 16, 6, 12
  width = pad * 3 + swatch + max(int(font.getlength(text)) for _, text in entries)
  height = max(picture.shape[0], pad * 2 + line * len(entries))
  legend = Image.new("RGB", (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(legend)
  table = colourise(np.asarray(present), colours)
  for i, ((_, text), colour) in enumerate(zip(entries, table)):
    y = pad + i * line
    draw.rectangle([pad, y, pad + swatch - 1, y + swatch - 1], fill=tuple(int(c) for c in colour),
                   outline=(0, 0, 0))
    draw.text((pad * 2 + swatch, y - 1), text, fill=(0, 0, 0), font=font)
  out = np.full((height, picture.shape[1] + width, 3), 255, np.uint8)
  out[:picture.shape[0], :picture.shape[1]] = picture
  out[:, picture.shape[1]:] = np.asarray(legend)
  return out


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
