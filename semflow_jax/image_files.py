"""The user's image and label-map files: reading them (one line naming the file and the problem
when they are not what a mode needs), checking where outputs go, and writing segmentations in
the class-id format and the dataset's official id format.

Photos are any PIL-readable image (alpha dropped, grey replicated) -> uint8 (H, W, 3); label
maps are single-channel PNGs of class ids (255 = ignore) -> uint8 (H, W). Files may be local
paths or bucket URLs (through `storage`); PNGs are written atomically (`images.write_png`).
"""

import io
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from semflow_jax import anchors, images, storage

LABELS_DIR = "labels"  # segmentations as class-id PNGs: the folder dataset's labels/ layout


class InputError(ValueError):
  """A user-supplied file is missing, unreadable or not what the mode needs."""


def open_image(path: str) -> Image.Image:
  """A loaded PIL image from a file (local or gs://); `InputError` if missing or unreadable."""
  if not path:
    raise InputError("--input is required for this mode")
  if not storage.is_file(path):
    raise InputError(f"{path}: no such file")
  return decode_image(storage.read_bytes(path), path)


def decode_image(data: bytes, name: str) -> Image.Image:
  """The bytes of an image file -> a loaded PIL image; `name` (a path, an upload's file name)
  is what an `InputError` names."""
  try:
    image = Image.open(io.BytesIO(data))
    image.load()
  except UnidentifiedImageError:
    raise InputError(f"{name}: not a readable image (no image format PIL knows)") from None
  except (OSError, SyntaxError, Image.DecompressionBombError) as e:
    raise InputError(f"{name}: not a readable image ({e.__class__.__name__}: {e})") from None
  return image


def read_image(path: str) -> np.ndarray:
  """Any PIL-readable image -> uint8 (H, W, 3); alpha is dropped, grey is replicated."""
  return np.asarray(open_image(path).convert("RGB"))


def read_label_map(path: str, num_classes: int) -> np.ndarray:
  """A single-channel PNG of class ids (255 = ignore) -> uint8 (H, W)."""
  return label_map_from_image(open_image(path), path, num_classes)


def label_map_from_image(image: Image.Image, name: str, num_classes: int) -> np.ndarray:
  """A single-channel image of class ids (255 = ignore) -> uint8 (H, W); `name` is what an
  `InputError` names."""
  if image.mode not in ("L", "P", "I", "I;16"):
    raise InputError(f"{name}: not a single-channel label map (mode {image.mode} with "
                     f"{len(image.getbands())} channels); expected 8-bit class ids")
  labels = np.asarray(image).astype(np.int64)
  bad = np.setdiff1d(np.unique(labels), np.r_[np.arange(num_classes), anchors.IGNORE_LABEL])
  if bad.size:
    shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
    raise InputError(f"{name}: label values {shown} are outside the dataset's classes "
                     f"0..{num_classes - 1} (255 = ignore)")
  return labels.astype(np.uint8)


def check_output(path: Optional[str], what: str, directory: bool) -> str:
  """--output, resolved; checked before anything is loaded: given, and a directory (or not
  there yet) when the mode writes a directory, not a directory when it writes one file."""
  if not path:
    raise InputError(f"--output is required ({what})")
  resolved = storage.resolve(path)
  if directory and storage.is_file(resolved):
    raise InputError(f"--output={resolved} is a file; this mode writes {what}")
  if not directory and storage.is_dir(resolved):
    raise InputError(f"--output={resolved} is a directory; this mode writes {what} (name the "
                     "file to write)")
  return resolved


def read_mask(path: str) -> np.ndarray:
  """Any PIL-readable image -> bool (H, W): its nonzero pixels (as a grey image)."""
  return np.asarray(open_image(path).convert("L")) > 0


def segmentation_folders(dataset: str) -> list:
  """The folders `write_segmentation` writes under its output directory for `dataset`
  (config.data.name): `labels/`, then the official ids' folder where the dataset has one."""
  from semflow_jax.data import classes
  official = classes.official_format(dataset)
  return [LABELS_DIR] + ([official[0]] if official else [])


def write_segmentation(output_dir: str, name: str, labels: np.ndarray, dataset: str) -> None:
  """Write one segmentation, uint8 (H, W) class ids, as `<output_dir>/labels/<name>.png` and,
  where the dataset has an official id format (data/classes.py), in that format too:

    <output_dir>/labelIds/<name>.png        Cityscapes: label ids for cityscapesscripts'
                                            evalPixelLevelSemanticLabeling
    <output_dir>/stuffthingmaps/<name>.png  COCO-Stuff: the stuffthingmaps values

  The official file is written first, so `labels/<name>.png` existing means both are there."""
  from semflow_jax.data import classes
  official = classes.official_format(dataset)
  if official:
    folder, table = official
    images.write_png(storage.join(output_dir, folder, name + ".png"), table[labels])
  images.write_png(storage.join(output_dir, LABELS_DIR, name + ".png"), labels)
