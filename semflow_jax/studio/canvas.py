"""Label maps <-> the studio's painting canvas, in numpy (no Gradio).

The canvas is the anchor image itself: class c is painted in the model's anchor colour of c
(`Palette`, 0..255) and the ignore label in the palette's ignore colour, so one brush per class
(and one for ignore) paints labels directly. A label map goes onto the canvas as its opaque
background; strokes are layers above it. Browser brushes anti-alias their edges and composite
layers with alpha, so a painted canvas comes back as colours between anchors; `snap` maps every
pixel to the nearest of the K anchors and the ignore colour: the nearest-anchor rule of
segmentation (`anchors.decode`) with ignore as one more candidate.
"""

from typing import Optional, Sequence

import numpy as np

from semflow_jax import anchors


def _uint8(unit) -> np.ndarray:
  """[-1, 1] -> 0..255, rounded as anchors.from_unit_range rounds."""
  return np.round(np.clip((np.asarray(unit, np.float64) + 1.0) * 127.5, 0, 255)).astype(np.uint8)


def palette_colours(palette: anchors.Palette) -> np.ndarray:
  """uint8 (K, 3): the anchors on the 0..255 scale (the brush colours)."""
  return _uint8(palette.array)


def ignore_colour(palette: anchors.Palette) -> np.ndarray:
  """uint8 (3,): the colour of label 255."""
  return _uint8(palette.ignore)


def hex_colour(rgb) -> str:
  return "#" + "".join(f"{int(v):02x}" for v in rgb)


def render(labels: np.ndarray, palette: anchors.Palette) -> np.ndarray:
  """uint8 (H, W) labels -> uint8 (H, W, 3) anchor colours (ignore in the ignore colour)."""
  table = np.tile(ignore_colour(palette), (256, 1))
  table[:palette.num_classes] = palette_colours(palette)
  return table[np.asarray(labels, np.int64)]


def to_editor(labels: np.ndarray, palette: anchors.Palette) -> dict:
  """A label map as the editor's value: the anchor image as its (opaque) background, no strokes.

  (Gradio's editor merges a loaded layer into the background once painting starts, so the
  labels live there and strokes, which its eraser removes, above them.)"""
  rgb = render(labels, palette)
  rgba = np.concatenate([rgb, np.full((*rgb.shape[:2], 1), 255, np.uint8)], axis=-1)
  return {"background": rgba, "layers": [], "composite": rgba}


def _over(top: np.ndarray, bottom_rgb: np.ndarray) -> np.ndarray:
  """RGBA (or RGB) uint8 `top` composited over float RGB `bottom_rgb` -> float RGB."""
  top = np.asarray(top, np.float64)
  if top.ndim == 2:  # a grey image
    top = np.repeat(top[..., None], 3, axis=-1)
  if top.shape[-1] == 3:
    return top
  alpha = top[..., 3:4] / 255.0
  return top[..., :3] * alpha + bottom_rgb * (1.0 - alpha)


def flatten(value: dict, palette: anchors.Palette) -> Optional[np.ndarray]:
  """The editor's value -> float (H, W, 3) colours as painted: the composite when the browser
  sent one, else the layers over the background; transparency shows the ignore colour."""
  ignore = ignore_colour(palette).astype(np.float64)
  if value.get("composite") is not None:
    composite = np.asarray(value["composite"])
    return _over(composite, np.broadcast_to(ignore, (*composite.shape[:2], 3)))
  background = value.get("background")
  layers = [layer for layer in value.get("layers") or [] if layer is not None]
  if background is None and not layers:
    return None
  shape = np.asarray(background if background is not None else layers[0]).shape[:2]
  rgb = np.broadcast_to(ignore, (*shape, 3)).astype(np.float64)
  for image in ([background] if background is not None else []) + layers:
    image = np.asarray(image)
    if image.shape[:2] != shape:
      raise ValueError(f"a canvas layer is {image.shape[0]}x{image.shape[1]}, the canvas "
                       f"{shape[0]}x{shape[1]}")
    rgb = _over(image, rgb)
  return rgb


def snap(rgb: np.ndarray, palette: anchors.Palette) -> np.ndarray:
  """Colours (H, W, 3) on the 0..255 scale -> uint8 labels: the nearest of the K anchors, or
  255 where the ignore colour is nearest."""
  candidates = np.concatenate([palette_colours(palette), ignore_colour(palette)[None]]).astype(
      np.float64)
  x = np.asarray(rgb, np.float64)
  # |x - a|^2 without |x|^2 (the same for every candidate), chunked by rows to bound memory
  # for 171 classes on a large canvas.
  norms = np.sum(candidates**2, axis=-1)
  labels = np.empty(x.shape[:2], np.uint8)
  rows = max(1, 2**22 // max(1, x.shape[1] * len(candidates)))
  for start in range(0, x.shape[0], rows):
    scores = norms - 2.0 * np.einsum("hwc,kc->hwk", x[start:start + rows], candidates)
    nearest = np.argmin(scores, axis=-1)
    labels[start:start + rows] = np.where(nearest == palette.num_classes, anchors.IGNORE_LABEL,
                                          nearest)
  return labels


def editor_labels(value: Optional[dict], palette: anchors.Palette) -> Optional[np.ndarray]:
  """The editor's value -> uint8 label map (None for an empty canvas)."""
  if value is None:
    return None
  rgb = flatten(value, palette)
  return None if rgb is None else snap(rgb, palette)


def painted_region(value: Optional[dict]) -> Optional[np.ndarray]:
  """bool (H, W): the pixels painted on any layer of an editor (alpha > 0), or None when nothing
  was painted (or there is no canvas)."""
  if value is None:
    return None
  layers = [np.asarray(layer) for layer in value.get("layers") or [] if layer is not None]
  region = None
  for layer in layers:
    painted = layer[..., 3] > 0 if layer.ndim == 3 and layer.shape[-1] == 4 else np.ones(
        layer.shape[:2], bool)
    region = painted if region is None else region | painted
  return region if region is not None and region.any() else None


def overlay_masks(labels: np.ndarray, names: Sequence[str]) -> list:
  """[(bool mask, class name)] for each class present, in class order (AnnotatedImage)."""
  labels = np.asarray(labels)
  return [(labels == c, names[c]) for c in np.unique(labels) if c != anchors.IGNORE_LABEL]
