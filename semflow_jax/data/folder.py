"""`folder_dataset`: your own images and label maps, from a folder (local or gs://).

Layout (names are matched by their path under images/ and labels/ without the extension, so
`images/street/0001.jpg` pairs with `labels/street/0001.png`; sub-folders are allowed):

  <folder>/classes.json
  <folder>/images/0001.jpg ...        any image PIL reads (JPEG, PNG, ...): RGB, grey or RGBA
  <folder>/labels/0001.png ...        single-channel PNGs of class ids at the image's size

or, with the split made by hand, the same two folders under train/ and validation/:

  <folder>/train/images/ ...  <folder>/train/labels/ ...
  <folder>/validation/images/ ...  <folder>/validation/labels/ ...

Without train/ and validation/, `config.data.validation_fraction` of the examples (rounded, at
least one) form the validation split: those whose names hash lowest, so the split depends on the
names only.

classes.json (only "classes" is required):

  {"classes": ["background", "road", "car"],         class names; class id = position
   "colours": [[0, 0, 0], [128, 64, 128], [0, 0, 142]],   preview colours (RGB), one per class
   "ignore": 0,                                      a label value that means "no label" (255
                                                     always does)
   "remap": {"7": 1, "26": 2, "0": 255}}             label value -> class id (255: no label);
                                                     when given, every value must be listed

Label values become class ids 0..K-1 (K = the number of names) or 255 (ignore: drawn white in
the anchor image, as for every dataset, and left out of every metric). Build (also happens on
first use, from `config.data.folder`, in single-process runs):

  python -m semflow_jax.data.build folder_dataset --manual_dir=/data/my_dataset \
      --data_dir=/data/tfds

Every problem stops the build with one line that starts with the file's path: an image without
a label or the reverse, an image and label of different sizes, label values outside the class
list, an unreadable file, a malformed classes.json. Nothing half-built is left behind (tfds
builds into a temporary directory and removes it when generation raises).

The tfds config name is the folder's name plus a hash of its path and the validation fraction;
the dataset records a fingerprint of the folder (classes.json and every file's name, and on a
local disk its size too), and a dataset whose folder has changed since it was built is built
again on first use.
Images are stored as their original JPEG/PNG bytes (anything else as PNG), labels as PNG.
"""

import dataclasses
import hashlib
import io
import json
import os
import posixpath
import zlib
from typing import Dict, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from semflow_jax import storage
from semflow_jax.data import manual, records
from semflow_jax.images import IMAGE_EXTENSIONS

NAME = "folder_dataset"
CLASSES_FILE = "classes.json"
IMAGE_DIR, LABEL_DIR = "images", "labels"
SPLITS = ("train", "validation")
IGNORE = manual.IGNORE
DEFAULT_VALIDATION_FRACTION = 0.1


class FolderError(manual.DataError):
  """A file of the folder is missing, unreadable or inconsistent: the message starts with it."""


@dataclasses.dataclass(frozen=True)
class ClassTable:
  """classes.json: class names, optional preview colours, and how label values become ids."""
  names: Tuple[str, ...]
  colours: Optional[Tuple[Tuple[int, int, int], ...]] = None
  ignore: int = IGNORE
  remap: Tuple[Tuple[int, int], ...] = ()   # (label value, class id or 255), sorted

  @property
  def num_classes(self) -> int:
    return len(self.names)

  def lookup(self) -> np.ndarray:
    """int16[256]: label value -> class id or 255; -1 for a value the table does not allow."""
    if self.remap:
      table = manual.lookup_table(dict(self.remap))
    else:
      table = manual.lookup_table({i: i for i in range(self.num_classes)})
    table[IGNORE] = IGNORE
    table[self.ignore] = IGNORE
    return table

  def to_json(self) -> dict:
    out = {"classes": list(self.names)}
    if self.colours is not None:
      out["colours"] = [list(c) for c in self.colours]
    if self.ignore != IGNORE:
      out["ignore"] = self.ignore
    if self.remap:
      out["remap"] = {str(k): v for k, v in self.remap}
    return out


def _int(value, what: str, path: str, low: int, high: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
    raise FolderError(f"{path}: {what} must be an integer in {low}..{high}, not {value!r}")
  return value


def parse_classes(text: str, path: str) -> ClassTable:
  """The ClassTable of classes.json's text; FolderError naming `path` for anything malformed."""
  try:
    spec = json.loads(text)
  except json.JSONDecodeError as e:
    raise FolderError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(spec, dict):
    raise FolderError(f"{path}: expected an object with \"classes\", found {type(spec).__name__}")
  unknown = sorted(set(spec) - {"classes", "colours", "ignore", "remap"})
  if unknown:
    raise FolderError(f"{path}: unknown keys {', '.join(unknown)} (expected classes, colours, "
                      "ignore, remap)")
  names = spec.get("classes")
  if (not isinstance(names, list) or not names
      or not all(isinstance(n, str) and n.strip() for n in names)):
    raise FolderError(f"{path}: \"classes\" must be a non-empty list of class names")
  if len(names) > IGNORE:
    raise FolderError(f"{path}: {len(names)} classes; at most {IGNORE} (255 is the ignore "
                      "label)")
  duplicates = sorted({n for n in names if names.count(n) > 1})
  if duplicates:
    raise FolderError(f"{path}: class names listed twice: {', '.join(duplicates)}")
  colours = spec.get("colours")
  if colours is not None:
    if not isinstance(colours, list) or len(colours) != len(names):
      raise FolderError(f"{path}: \"colours\" must list one [r, g, b] per class "
                        f"({len(names)})")
    for i, c in enumerate(colours):
      if not isinstance(c, list) or len(c) != 3:
        raise FolderError(f"{path}: colour {i} ({names[i]}) must be [r, g, b], not {c!r}")
      for v in c:
        _int(v, f"colour {i} ({names[i]})", path, 0, 255)
    colours = tuple(tuple(c) for c in colours)
  ignore = _int(spec.get("ignore", IGNORE), "\"ignore\"", path, 0, 255)
  remap = spec.get("remap", {})
  if not isinstance(remap, dict):
    raise FolderError(f"{path}: \"remap\" must map label values to class ids, e.g. "
                      "{\"7\": 0, \"8\": 1}")
  pairs = {}
  for key, value in remap.items():
    if not str(key).isdigit() or int(key) > 255:
      raise FolderError(f"{path}: remap key {key!r} is not a label value 0..255")
    if isinstance(value, bool) or not isinstance(value, int) or not (
        0 <= value < len(names) or value == IGNORE):
      raise FolderError(f"{path}: remap {key} -> {value!r}: not a class id 0..{len(names) - 1} "
                        "or 255 (ignore)")
    pairs[int(key)] = value
  if ignore in pairs and pairs[ignore] != IGNORE:
    raise FolderError(f"{path}: label value {ignore} is both \"ignore\" and remapped to "
                      f"{pairs[ignore]}")
  return ClassTable(tuple(names), colours, ignore, tuple(sorted(pairs.items())))


def read_classes(folder: str) -> ClassTable:
  """The folder's classes.json (local or gs://)."""
  path = storage.join(folder, CLASSES_FILE)
  if not storage.is_file(path):
    raise FolderError(f"{path}: no such file; a folder dataset needs a classes.json listing its "
                      "class names, e.g. {\"classes\": [\"background\", \"road\", \"car\"]}")
  return parse_classes(storage.read_text(path), path)


def check_config(data) -> ClassTable:
  """config.data of a folder dataset against its folder's classes.json, before anything runs:
  the folder is set and exists, and config.data.num_classes is the number of classes listed."""
  folder = data.get("folder")
  if not folder:
    raise FolderError("config.data.folder is not set: pass --config.data.folder=DIR, the folder "
                      "holding classes.json and images/ + labels/ (semflow_jax/data/folder.py)")
  if not storage.is_dir(folder):
    raise FolderError(f"{storage.resolve(folder)}: no such folder (config.data.folder)")
  classes = read_classes(folder)
  if data.get("num_classes") != classes.num_classes:
    raise FolderError(
        f"{storage.join(folder, CLASSES_FILE)} lists {classes.num_classes} classes, but "
        f"config.data.num_classes={data.get('num_classes')}; pass "
        f"--config.data.num_classes={classes.num_classes}")
  fraction = data.get("validation_fraction", DEFAULT_VALIDATION_FRACTION)
  if not 0 <= fraction < 1:
    raise FolderError(f"config.data.validation_fraction={fraction}: expected 0 <= f < 1")
  return classes


# -- the files -------------------------------------------------------------------------------
def _walk(directory: str, extensions) -> Dict[str, str]:
  """{path under `directory` without extension (posix): path} of the files with `extensions`."""
  found = {}
  for relative, path in storage.files_under(directory):
    key, ext = posixpath.splitext(relative)
    if ext.lower() not in extensions or posixpath.basename(relative).startswith("."):
      continue
    if key in found:
      raise FolderError(f"{path}: two files named {key} (with {found[key]})")
    found[key] = path
  return found


def _pairs(part: str) -> list:
  """[(name, image path, label path)] of images/ and labels/ in `part`, sorted by name."""
  image_dir, label_dir = storage.join(part, IMAGE_DIR), storage.join(part, LABEL_DIR)
  for directory in (image_dir, label_dir):
    if not storage.is_dir(directory):
      raise FolderError(f"{directory}: no such folder (a folder dataset holds images/ and "
                        "labels/, or train/ and validation/ each holding both)")
  pairs = manual.pair_up(_walk(image_dir, IMAGE_EXTENSIONS), _walk(label_dir, (".png",)))
  if not pairs:
    raise FolderError(f"{image_dir}: no images (extensions {', '.join(IMAGE_EXTENSIONS)})")
  return pairs


def split_pairs(folder: str, validation_fraction: float) -> Dict[str, list]:
  """{'train': pairs, 'validation': pairs}: the sub-folders' or a fraction of the examples."""
  has_splits = [storage.is_dir(storage.join(folder, s)) for s in SPLITS]
  if all(has_splits):
    return {s: _pairs(storage.join(folder, s)) for s in SPLITS}
  if any(has_splits):
    present, missing = (SPLITS[0], SPLITS[1]) if has_splits[0] else (SPLITS[1], SPLITS[0])
    raise FolderError(f"{storage.join(folder, missing)}: no such folder, but "
                      f"{storage.join(folder, present)} exists (give both, or neither and "
                      "config.data.validation_fraction)")
  pairs = _pairs(folder)
  count = int(round(validation_fraction * len(pairs)))
  if validation_fraction > 0:
    count = min(max(count, 1), len(pairs) - 1)
  if len(pairs) - count < 1 or (validation_fraction > 0 and count < 1):
    raise FolderError(f"{storage.join(folder, IMAGE_DIR)}: {len(pairs)} example(s) cannot make "
                      f"a train and a validation split")
  order = sorted(pairs, key=lambda p: (zlib.crc32(p[0].encode()), p[0]))
  validation = {p[0] for p in order[:count]}
  return {"train": [p for p in pairs if p[0] not in validation],
          "validation": [p for p in pairs if p[0] in validation]}


def fingerprint(folder: str) -> str:
  """A hash of classes.json and of every file's path under the folder, and on a local disk of
  its size too (on a bucket that would be one request per file)."""
  sizes = not storage.is_url(folder)
  h = hashlib.sha256()
  for relative, path in storage.files_under(folder):
    size = os.path.getsize(path) if sizes else ""
    h.update(f"{relative}\0{size}\n".encode())
  h.update(storage.read_bytes(storage.join(folder, CLASSES_FILE)))
  return h.hexdigest()[:16]


def _open(path: str) -> Tuple[Image.Image, bytes]:
  try:
    data = storage.read_bytes(path)
    image = Image.open(io.BytesIO(data))
    image.load()
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError,
          Image.DecompressionBombError) as e:
    raise FolderError(f"{path}: not a readable image ({e.__class__.__name__}: {e})") from None
  return image, data


def _load_example(pair, table: np.ndarray, num_classes: int):
  name, image_path, label_path = pair
  image, data = _open(image_path)
  if image.format not in ("JPEG", "PNG") or image.mode not in ("RGB", "L"):
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
  label_image, _ = _open(label_path)
  if label_image.mode not in ("L", "P"):
    raise FolderError(f"{label_path}: not a single-channel 8-bit label map (mode "
                      f"{label_image.mode}); expected a PNG of class ids")
  raw = np.asarray(label_image, np.uint8)
  manual.check_same_size(image_path, (image.height, image.width), label_path, raw.shape)
  mapped = table[raw]
  if (mapped < 0).any():
    bad = np.unique(raw[mapped < 0])
    shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
    raise FolderError(f"{label_path}: label values {shown} are not classes of "
                      f"{CLASSES_FILE} (ids 0..{num_classes - 1}, 255 = ignore)")
  return manual.example(name, data, mapped.astype(np.uint8), name)


# -- the builder -----------------------------------------------------------------------------
class FolderConfig(tfds.core.BuilderConfig):
  """One folder (local or gs://) with its class table and validation fraction."""

  fingerprint: Optional[str] = None  # of the folder's contents, set by `builder`

  def __init__(self, *, folder: str, classes: ClassTable,
               validation_fraction: float = DEFAULT_VALIDATION_FRACTION, **kwargs):
    folder = storage.resolve(folder)
    key = hashlib.sha256(f"{folder}\0{validation_fraction!r}".encode()).hexdigest()[:10]
    base = "".join(c if c.isalnum() else "_" for c in posixpath.basename(folder.rstrip("/")))
    kwargs.setdefault("name", f"{base or 'folder'}_{key}")
    kwargs.setdefault("description", f"{folder} (validation fraction {validation_fraction})")
    super().__init__(**kwargs)
    self.folder = folder
    self.classes = classes
    self.validation_fraction = validation_fraction


class FolderDataset(records.RandomAccessBuilder):
  """Images and label maps from a folder with a classes.json; see the module docstring.
  Stored as ArrayRecord like the other datasets (records.py), built in shards."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}

  def _info(self):
    cfg = self.builder_config
    classes = cfg.classes
    return self.dataset_info_from_configs(
        features=manual.features("png"),
        description=__doc__,
        supervised_keys=("image", "label"),
        metadata=tfds.core.MetadataDict(class_names=list(classes.names),
                                        classes=classes.to_json(), folder=cfg.folder,
                                        fingerprint=getattr(cfg, "fingerprint", None)),
    )

  def split_items(self, manual_dir):
    del manual_dir  # the folder is in the config
    cfg = self.builder_config
    pairs = split_pairs(cfg.folder, cfg.validation_fraction)
    return {split: pairs[split] for split in SPLITS if pairs[split]}

  def load_example(self, item):
    classes = self.builder_config.classes
    return _load_example(item, classes.lookup(), classes.num_classes)


def builder(folder: str, validation_fraction: float = DEFAULT_VALIDATION_FRACTION,
            data_dir: Optional[str] = None) -> FolderDataset:
  """The tfds builder of `folder` (local or gs://; not built yet, see `prepare`)."""
  config = FolderConfig(folder=folder, classes=read_classes(folder),
                        validation_fraction=validation_fraction)
  config.fingerprint = fingerprint(folder)
  return FolderDataset(config=config, data_dir=data_dir)


def get_builder(data) -> FolderDataset:
  """The dataset of config.data (`folder`, `validation_fraction`, `tfds_data_dir`), built first
  when it is not built or its folder changed (single-process runs; several processes need it
  built beforehand, by the command in the error)."""
  import jax
  check_config(data)
  fraction = data.get("validation_fraction", DEFAULT_VALIDATION_FRACTION)
  b = builder(data.folder, fraction, data.get("tfds_data_dir") or None)
  if jax.process_count() > 1 and not _is_current(b):
    raise FileNotFoundError(
        f"dataset {NAME} of {b.builder_config.folder} is not built (or the folder changed) in "
        f"{b.data_dir_root}; build it once before a multi-process run: `python -m "
        f"semflow_jax.data.build {NAME} --manual_dir={b.builder_config.folder} "
        f"--validation_fraction={fraction} --data_dir={b.data_dir_root}`")
  return prepare(b)


def _is_current(b: FolderDataset) -> bool:
  return b.is_prepared() and (b.info.metadata or {}).get("fingerprint") == \
      b.builder_config.fingerprint


def prepare(b: FolderDataset, **build_options) -> Optional[FolderDataset]:
  """Build the dataset if it is not built, or if its folder changed since (a stale build is
  removed first); returns the builder (None on a build worker other than 0).
  `build_options`: records.build's processes, num_workers, worker_index, ..."""
  if b.is_prepared() and not _is_current(b):
    from absl import logging
    logging.info("%s changed since %s was built from it: building it again",
                 b.builder_config.folder, b.data_dir)
    storage.remove_tree(b.data_dir)
    b = FolderDataset(config=b.builder_config, data_dir=b.data_dir_root)
  if not b.is_prepared():
    return records.build(b, None, **build_options)
  return b
