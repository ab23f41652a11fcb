"""Shared pieces of the builders that read manual downloads: their base class, features, file
checks, label maps.

Every problem with the downloaded files raises `DataError` with a message that starts with the
offending path, so a build over hundreds of thousands of files says which one to look at.
A build that raises it removes what it had written (`records.build`): no half-written dataset
is left behind.
"""

import abc
import concurrent.futures
import io
import os
import sys
from typing import Callable, Dict, Iterator, Sequence, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from semflow_jax.data import records

IGNORE = 255


class DataError(ValueError):
  """A file of a manual download is missing, unreadable or inconsistent with its partner."""


def features(image_encoding: str) -> tfds.features.FeaturesDict:
  """image uint8 HxWx3 (stored as `image_encoding`), label uint8 HxWx1 PNG, source file name."""
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3), encoding_format=image_encoding),
      "label": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
      "file_name": tfds.features.Text(),
  })


def dataset_info(builder, image_encoding: str, homepage: str, class_names) -> "tfds.core.DatasetInfo":
  """A manual-download dataset's DatasetInfo: `features(image_encoding)`, (image, label) pairs,
  the class names in its metadata, the module docstring as description, and examples kept in
  the builder's `split_items` order."""
  return builder.dataset_info_from_configs(
      features=features(image_encoding),
      description=sys.modules[type(builder).__module__].__doc__,
      supervised_keys=("image", "label"),
      homepage=homepage,
      metadata=tfds.core.MetadataDict(class_names=list(class_names)),
      disable_shuffling=True,  # stored in split_items order
  )


class ManualDownloadBuilder(records.RandomAccessBuilder):
  """A builder of a manual download, one module of this package per dataset.

  The part of the module's docstring from "Download" to "Build:" is the dataset's
  MANUAL_DOWNLOAD_INSTRUCTIONS: tfds prints it when the manual dir is missing, and so do the
  errors of `split_items` and `subdir`. A subclass lists its examples in the unpacked download
  with `items_under(root)`.
  """

  def __init_subclass__(cls, **kwargs):
    super().__init_subclass__(**kwargs)
    if "MANUAL_DOWNLOAD_INSTRUCTIONS" not in cls.__dict__:
      doc = sys.modules[cls.__module__].__doc__ or ""
      cls.MANUAL_DOWNLOAD_INSTRUCTIONS = doc[doc.index("Download"):doc.index("Build:")]

  def split_items(self, manual_dir):
    return self.items_under(require_manual_dir(manual_dir, self.MANUAL_DOWNLOAD_INSTRUCTIONS))

  @abc.abstractmethod
  def items_under(self, root: str) -> Dict[str, Sequence]:
    """{split: items} of the download unpacked at `root`."""

  def subdir(self, root: str, *parts: str) -> str:
    """root/parts..., which must be a directory (the error repeats the download instructions)."""
    return require_dir(os.path.join(root, *parts), self.MANUAL_DOWNLOAD_INSTRUCTIONS)

  def paired_folders(self, root: str, folders: Dict[str, str], images: Tuple[str, str],
                     labels: Tuple[str, str], recursive: bool = False) -> Dict[str, list]:
    """{split: pair_up(images, label maps)} of a download whose images and label maps lie in
    parallel folders: for each split's folder in `folders`, `root/<images[0]>/<folder>` holds
    the images `<key><images[1]>` and `root/<labels[0]>/<folder>` their label maps
    `<key><labels[1]>` (`recursive`: in subfolders too, the key then the path below the
    folder)."""
    list_files = files_below if recursive else files_with_suffix
    items = {}
    for split, folder in folders.items():
      image_dir = self.subdir(root, images[0], folder)
      label_dir = self.subdir(root, labels[0], folder)
      items[split] = pair_up(list_files(image_dir, images[1]), list_files(label_dir, labels[1]))
    return items


def require_manual_dir(path, instructions: str) -> str:
  """The manual download directory if it exists; otherwise an error with the instructions."""
  if not path:
    raise DataError("no manual download directory given (--manual_dir or "
                    f"config.data.manual_dir). Download and unpack:\n{instructions}")
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise DataError(f"{path}: the manual download directory (manual_dir) does not exist. "
                    f"Download and unpack:\n{instructions}")
  return path


def require_dir(path: str, instructions: str) -> str:
  """`path` if it is a directory; otherwise an error that repeats the download instructions."""
  if not os.path.isdir(path):
    raise DataError(f"{path}: no such directory in the manual download directory. "
                    f"Expected layout:\n{instructions}")
  return path


def open_image(path: str) -> Image.Image:
  """The fully decoded PIL image (a truncated file fails here, not later in training)."""
  try:
    image = Image.open(path)
    image.load()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{path}: not a readable image ({e.__class__.__name__}: {e})") from None
  return image


def read_rgb(path: str) -> tuple:
  """(encoded bytes to store, (H, W)) of an image file.

  JPEGs and PNGs that decode to RGB or grey are stored byte for byte (tf decodes grey to RGB);
  anything else (CMYK, palette, alpha) is converted to RGB and re-encoded losslessly.
  """
  image = open_image(path)
  with open(path, "rb") as f:
    data = f.read()
  if image.format not in ("JPEG", "PNG") or image.mode not in ("RGB", "L"):
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
  return data, (image.height, image.width)


def read_label(path: str) -> np.ndarray:
  """A label map PNG -> uint8 (H, W) of its raw values; colour label maps are an error."""
  image = open_image(path)
  if image.mode not in ("L", "P"):
    raise DataError(f"{path}: not a single-channel 8-bit label map (mode {image.mode})")
  return np.asarray(image, np.uint8)


def lookup_table(raw_to_class: Dict[int, int]) -> np.ndarray:
  """int16[256]: raw value -> class id (255 = ignore), -1 where the class table has no entry."""
  table = np.full(256, -1, np.int16)
  for raw, cls in raw_to_class.items():
    table[raw] = cls
  return table


def remap(raw: np.ndarray, table: np.ndarray, path: str) -> np.ndarray:
  """Raw label values -> class ids through `table`; unknown values are an error naming `path`."""
  mapped = table[raw]
  if (mapped < 0).any():
    unknown = np.unique(raw[mapped < 0])
    shown = ", ".join(str(v) for v in unknown[:8]) + (", ..." if unknown.size > 8 else "")
    raise DataError(f"{path}: label values {shown} are not in the class table")
  return mapped.astype(np.uint8)


def check_same_size(image_path: str, image_hw, label_path: str, label_hw) -> None:
  if tuple(image_hw) != tuple(label_hw):
    raise DataError(f"{image_path}: image is {image_hw[1]}x{image_hw[0]} but its label "
                    f"{label_path} is {label_hw[1]}x{label_hw[0]} (width x height)")


def pair_up(images: Dict[str, str], labels: Dict[str, str]) -> list:
  """[(key, image path, label path)] sorted by key; an unpaired file on either side is an error."""
  for key in sorted(set(images) - set(labels)):
    raise DataError(f"{images[key]}: image without a label (no matching label file found)")
  for key in sorted(set(labels) - set(images)):
    raise DataError(f"{labels[key]}: label without an image (no matching image file found)")
  return [(key, images[key], labels[key]) for key in sorted(images)]


def files_with_suffix(directory: str, suffix: str, recursive: bool = False) -> Dict[str, str]:
  """{name without `suffix`: path} of the files in `directory` (and subdirectories)."""
  found = {}
  walk = os.walk(directory) if recursive else [(directory, None, os.listdir(directory))]
  for root, _, names in walk:
    for name in names:
      if name.endswith(suffix):
        found[name[:-len(suffix)]] = os.path.join(root, name)
  return found


def files_below(directory: str, suffix: str) -> Dict[str, str]:
  """{path below `directory` without `suffix`: path} of the files in it and its subdirectories."""
  found = files_with_suffix(directory, suffix, recursive=True)
  return {os.path.relpath(path, directory)[:-len(suffix)]: path for path in found.values()}


def ordered_map(fn: Callable, items: Sequence, chunk: int = 64) -> Iterator:
  """fn over items in order, decoding files on a few threads (PIL releases the GIL).

  Chunked so that at most `chunk` decoded examples are held at a time.
  """
  workers = min(8, os.cpu_count() or 1)
  with concurrent.futures.ThreadPoolExecutor(workers) as pool:
    for start in range(0, len(items), chunk):
      yield from pool.map(fn, items[start:start + chunk])


def example(key: str, image, label: np.ndarray, file_name: str) -> tuple:
  return key, {"image": image, "label": label[..., None], "file_name": file_name}


def load_pair(pair: tuple, table: np.ndarray) -> tuple:
  """The example of (key, image path, label path): the image's bytes (`read_rgb`) and its label
  map's raw values through `table` (`lookup_table`)."""
  key, image_path, label_path = pair
  image, image_hw = read_rgb(image_path)
  raw = read_label(label_path)
  check_same_size(image_path, image_hw, label_path, raw.shape)
  return example(key, image, remap(raw, table, label_path), os.path.basename(image_path))
