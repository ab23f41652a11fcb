"""`celebamask_hq`: CelebAMask-HQ face parsing, 19 classes (background + 18 parts), 512x512.

Download (manual: the dataset's non-commercial licence): CelebAMask-HQ.zip from
https://github.com/switchablenorms/CelebAMask-HQ, unpacked so that the manual directory holds

  <manual_dir>/CelebA-HQ-img/0.jpg ... 29999.jpg                      (1024x1024 JPEGs)
  <manual_dir>/CelebAMask-HQ-mask-anno/0/00000_skin.png ...            (512x512, folder i // 2000)
  <manual_dir>/CelebA-HQ-to-CelebA-mapping.txt                         (optional, for the split)
  <manual_dir>/list_eval_partition.txt     (optional: CelebA's Eval/list_eval_partition.txt)

Build:
  python -m semflow_jax.data.build celebamask_hq --manual_dir=<manual_dir> --data_dir=<tfds dir> \
      [--processes=8]
(in parallel shards, see build.py), or let `pipeline.get_builder` build it when
`config.data.manual_dir` is set. Stored as ArrayRecord for random access, in image-index order.

Each image's part masks `<iiiii>_<part>.png` (non-zero = part) are painted in the dataset's
standard order (PARTS: skin, nose, eye_g, ..., cloth, as in the dataset's own g_mask.py), label
= 1 + the part's index, later parts over earlier ones; unpainted pixels are background 0. An
image without any mask, a mask without an image and an unknown part name are errors. Images
are resized (PIL bicubic) to the mask size and stored as JPEG (quality 95).

Splits, reproducible from the files alone: with both the mapping file and CelebA's partition
file, the CelebA partition of each image's source (train / validation / test = partition
0 / 1 / 2; 24,183 / 2,993 / 2,824 images); otherwise the fixed split used by SPADE-style
synthesis work: images 0..27999 train, 28000..29999 validation.
"""

import io
import os
import re

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from semflow_jax.data import manual

PARTS = ("skin", "nose", "eye_g", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
         "mouth", "u_lip", "l_lip", "hair", "hat", "ear_r", "neck_l", "neck", "cloth")
CLASS_NAMES = ("background",) + PARTS
NUM_CLASSES = len(CLASS_NAMES)  # 19
FIXED_SPLIT_FIRST_VALIDATION = 28000
IMAGE_DIR = "CelebA-HQ-img"
MASK_DIR = "CelebAMask-HQ-mask-anno"
MAPPING_FILE = "CelebA-HQ-to-CelebA-mapping.txt"
PARTITION_FILE = "list_eval_partition.txt"
_MASK_NAME = re.compile(r"^(\d{5})_(.+)\.png$")
_PARTITION_SPLITS = {0: "train", 1: "validation", 2: "test"}


class CelebamaskHq(manual.ManualDownloadBuilder):
  """CelebAMask-HQ: 30k CelebA-HQ faces with 19-class parsing maps."""

  name = "celebamask_hq"
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "ArrayRecord (random access), examples in image-index order."}

  def items_under(self, root):
    image_dir, mask_dir = self.subdir(root, IMAGE_DIR), self.subdir(root, MASK_DIR)
    images = {}
    for key, path in manual.files_with_suffix(image_dir, ".jpg").items():
      if not key.isdigit():
        raise manual.DataError(f"{path}: not a CelebA-HQ image name (expected <index>.jpg)")
      images[int(key)] = path
    masks = _masks_by_index(mask_dir)
    # Paired on the first mask's path, so that an unpaired mask is named in the error.
    pairs = [(key, image_path, masks[int(key)]) for key, image_path, _ in manual.pair_up(
        {f"{i:05d}": p for i, p in images.items()},
        {f"{i:05d}": parts[0][1] for i, parts in masks.items()})]
    split_of = _split_assignment(root, [int(key) for key, _, _ in pairs])
    by_split = {}
    for pair in pairs:
      by_split.setdefault(split_of[int(pair[0])], []).append(pair)
    return {split: by_split[split] for split in ("train", "validation", "test")
            if by_split.get(split)}

  def load_example(self, item):
    return _load_example(item)

  def _info(self):
    return manual.dataset_info(self, "jpeg", "https://github.com/switchablenorms/CelebAMask-HQ",
                               CLASS_NAMES)


def _masks_by_index(mask_dir):
  """{image index: [(part index, path)] in painting order}."""
  masks = {}
  for _name, path in sorted(manual.files_with_suffix(mask_dir, ".png", recursive=True).items()):
    match = _MASK_NAME.match(os.path.basename(path))
    if not match or match.group(2) not in PARTS:
      raise manual.DataError(f"{path}: not a CelebAMask-HQ part mask name (expected "
                             f"<iiiii>_<part>.png with part one of {', '.join(PARTS)})")
    masks.setdefault(int(match.group(1)), []).append((PARTS.index(match.group(2)), path))
  return {i: sorted(parts) for i, parts in masks.items()}


def _split_assignment(root, indices):
  """{image index: split}; the CelebA partition when both files exist, else the fixed split."""
  mapping_path = os.path.join(root, MAPPING_FILE)
  partition_path = os.path.join(root, PARTITION_FILE)
  if not (os.path.isfile(mapping_path) and os.path.isfile(partition_path)):
    logging.info("celebamask_hq: %s or %s missing; using the fixed split (first validation "
                 "image %d)", MAPPING_FILE, PARTITION_FILE, FIXED_SPLIT_FIRST_VALIDATION)
    return {i: "train" if i < FIXED_SPLIT_FIRST_VALIDATION else "validation" for i in indices}
  partition = {}
  for line_no, fields in _rows(partition_path):
    if len(fields) != 2 or not fields[1].isdigit() or int(fields[1]) not in _PARTITION_SPLITS:
      raise manual.DataError(f"{partition_path}: line {line_no} is not '<file> <0|1|2>'")
    partition[fields[0]] = _PARTITION_SPLITS[int(fields[1])]
  split_of = {}
  for line_no, fields in _rows(mapping_path):
    if fields[:1] == ["idx"]:  # header
      continue
    if len(fields) != 3 or not fields[0].isdigit():
      raise manual.DataError(f"{mapping_path}: line {line_no} is not 'idx orig_idx orig_file'")
    if fields[2] not in partition:
      raise manual.DataError(f"{mapping_path}: line {line_no}: {fields[2]} is not in "
                             f"{partition_path}")
    split_of[int(fields[0])] = partition[fields[2]]
  for i in indices:
    if i not in split_of:
      raise manual.DataError(f"{mapping_path}: no entry for image {i}.jpg")
  return split_of


def _rows(path):
  with open(path) as f:
    for line_no, line in enumerate(f, 1):
      if line.strip():
        yield line_no, line.split()


def _load_example(pair):
  key, image_path, parts = pair
  label, label_hw = None, None
  for part_index, mask_path in parts:
    mask = np.asarray(manual.open_image(mask_path))
    mask = mask[..., 0] if mask.ndim == 3 else mask  # some masks are saved as RGB
    if label is None:
      label_hw = mask.shape
      label = np.zeros(label_hw, np.uint8)
    elif mask.shape != label_hw:
      raise manual.DataError(f"{mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but "
                             f"{parts[0][1]} is {label_hw[1]}x{label_hw[0]}")
    label[mask != 0] = part_index + 1
  image = manual.open_image(image_path)
  scale = image.height / label_hw[0]
  # The HQ images are 1024x1024 and the masks 512x512: the same frame at twice the size. Any
  # other relation means the files do not belong together.
  if (image.width * label_hw[0] != image.height * label_hw[1] or scale < 1
      or scale != int(scale)):
    manual.check_same_size(image_path, (image.height, image.width), parts[0][1], label_hw)
  if scale == 1:
    encoded, _ = manual.read_rgb(image_path)  # already at the mask size: keep the bytes
  else:
    buffer = io.BytesIO()
    image.convert("RGB").resize((label_hw[1], label_hw[0]), Image.Resampling.BICUBIC).save(
        buffer, format="JPEG", quality=95)
    encoded = buffer.getvalue()
  return manual.example(key, encoded, label, os.path.basename(image_path))
