"""Small trees in the exact layout of the official downloads, written with PIL.

Every writer returns what a test needs to check the built dataset: the paths it wrote and the
content it put there. Images are small (tens of pixels); file names, folders and formats are
the real ones.
"""

import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image


def _save(path, array, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)
  return path


def _smooth_image(rng, height, width):
  """A JPEG-friendly image: gradients plus a little noise."""
  yy, xx = np.mgrid[0:height, 0:width]
  base = rng.uniform(40, 200, 3)
  image = base + 40 * np.stack([np.sin(xx / 7 + c) * np.cos(yy / 5 - c) for c in range(3)], -1)
  return np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)


# COCO-Stuff: raw values in vertical stripes; the class each must become (from the issue and
# the COCO category list: raw 0 person, 12 stop sign, 91 banner, 181 wood, 255 unlabelled).
COCO_RAW_TO_EXPECTED = {0: 0, 12: 11, 13: 12, 24: 23, 26: 24, 91: 80, 181: 170, 255: 255}
COCO_IDS = {"train2017": (9, 25, 30, 34), "val2017": (139, 285, 632)}
COCO_SIZES = ((40, 56), (48, 36), (44, 44))  # (H, W), cycled: landscape, portrait, square


def write_coco_stuff(root, seed=0):
  """{split folder: [(file id, image path, label path, raw label)]}."""
  rng = np.random.default_rng(seed)
  raws = np.array(list(COCO_RAW_TO_EXPECTED), np.uint8)
  out = {}
  for folder, ids in COCO_IDS.items():
    out[folder] = []
    for n, file_id in enumerate(ids):
      h, w = COCO_SIZES[n % len(COCO_SIZES)]
      stem = f"{file_id:012d}"
      image_path = _save(os.path.join(root, folder, stem + ".jpg"), _smooth_image(rng, h, w),
                         quality=90)
      stripes = np.roll(raws, n)[(np.arange(w) * len(raws)) // w]
      raw = np.broadcast_to(stripes, (h, w)).copy()
      label_path = _save(os.path.join(root, "stuffthingmaps_trainval2017", folder, stem + ".png"),
                         raw)
      out[folder].append((stem, image_path, label_path, raw))
  return out


# Cityscapes: the image's red channel is 7 x the raw label id, so crops and flips of image and
# label can be checked against each other; green/blue encode x/y.
CITYSCAPES_FILES = {
    "train": ("aachen/aachen_000000_000019", "aachen/aachen_000001_000019",
              "bochum/bochum_000000_000313", "bremen/bremen_000000_000019",
              "bremen/bremen_000001_000019", "cologne/cologne_000000_000019",
              "darmstadt/darmstadt_000000_000019", "dusseldorf/dusseldorf_000000_000019"),
    "val": ("frankfurt/frankfurt_000000_000294", "lindau/lindau_000000_000019",
            "munster/munster_000000_000019"),
}
CITYSCAPES_SIZE = (32, 64)  # (H, W); the real images are 1024x2048, same aspect
CITYSCAPES_RED_SCALE = 7


def write_cityscapes(root, seed=0, size=CITYSCAPES_SIZE):
  """{split: [(key, image path, label path, raw label ids)]}; ids 0..33 in blocks."""
  rng = np.random.default_rng(seed)
  h, w = size
  out = {}
  for split, keys in CITYSCAPES_FILES.items():
    out[split] = []
    for key in keys:
      block = 4
      ids = rng.integers(0, 34, (h // block + 1, w // block + 1))
      raw = np.kron(ids, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)
      yy, xx = np.mgrid[0:h, 0:w]
      image = np.stack([raw * CITYSCAPES_RED_SCALE, xx % 256, yy % 256], -1).astype(np.uint8)
      image_path = _save(os.path.join(root, "leftImg8bit", split, key + "_leftImg8bit.png"),
                         image)
      label_path = _save(os.path.join(root, "gtFine", split, key + "_gtFine_labelIds.png"), raw)
      # The other gtFine files are present in the real download and must be ignored.
      _save(os.path.join(root, "gtFine", split, key + "_gtFine_color.png"),
            np.zeros((h, w, 3), np.uint8))
      with open(os.path.join(root, "gtFine", split, key + "_gtFine_polygons.json"), "w") as f:
        f.write("{}")
      out[split].append((key, image_path, label_path, raw))
  return out


# CelebAMask-HQ: images at twice the mask size (1024 vs 512 in the real data).
CELEBA_INDICES = (0, 1, 2, 28000, 28001)
CELEBA_MASK_SIZE = 16


def celeba_part_masks(index, size=CELEBA_MASK_SIZE):
  """{part: bool mask} with deliberate overlaps: skin under everything, eye_g under l_eye."""
  m = {}
  full = np.zeros((size, size), bool)
  m["skin"] = full.copy()
  m["skin"][2:14, 2:14] = True
  m["hair"] = full.copy()
  m["hair"][0:5, :] = True                     # over skin rows 2..4
  m["nose"] = full.copy()
  m["nose"][7:10, 7:9] = True
  m["eye_g"] = full.copy()
  m["eye_g"][5:7, 3:13] = True
  m["l_eye"] = full.copy()
  m["l_eye"][5:7, 4:6] = True                  # painted after eye_g
  m["cloth"] = full.copy()
  m["cloth"][13:16, (index % 3):] = True       # over skin row 13
  return m


def write_celebamask_hq(root, seed=0, indices=CELEBA_INDICES, size=CELEBA_MASK_SIZE,
                        image_scale=2):
  """{index: (image path, {part: mask path})}."""
  rng = np.random.default_rng(seed)
  out = {}
  for index in indices:
    image_path = _save(os.path.join(root, "CelebA-HQ-img", f"{index}.jpg"),
                       _smooth_image(rng, size * image_scale, size * image_scale), quality=95)
    parts = {}
    for n, (part, mask) in enumerate(celeba_part_masks(index, size).items()):
      pixels = mask.astype(np.uint8) * 255
      if n % 2:  # the real masks come both as grey and as RGB PNGs
        pixels = np.repeat(pixels[..., None], 3, -1)
      parts[part] = _save(os.path.join(root, "CelebAMask-HQ-mask-anno", str(index // 2000),
                                       f"{index:05d}_{part}.png"), pixels)
    out[index] = (image_path, parts)
  return out


def write_celeba_partition(root, partition_of):
  """The mapping file (HQ index -> CelebA file) and CelebA's partition file."""
  with open(os.path.join(root, "CelebA-HQ-to-CelebA-mapping.txt"), "w") as f:
    f.write("idx         orig_idx    orig_file\n")
    for index in partition_of:
      f.write(f"{index:<12}{index * 7 + 11:<12}{index * 7 + 12:06d}.jpg\n")
  with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
    for index, part in partition_of.items():
      f.write(f"{index * 7 + 12:06d}.jpg {part}\n")
    f.write("999999.jpg 0\n")  # CelebA images that are not in CelebA-HQ


WRITERS = {"coco_stuff": write_coco_stuff, "cityscapes_semantic": write_cityscapes,
           "celebamask_hq": write_celebamask_hq}


def build(name, manual_dir, data_dir, **kwargs):
  """The prepared tfds builder of `name` built from `manual_dir` (as the build command does)."""
  from semflow_jax.data import records  # also registers the builders
  builder = tfds.builder(name, data_dir=str(data_dir))
  return records.build(builder, str(manual_dir), **kwargs)


def examples(builder, split):
  """{file name: example} of a split, decoded to numpy (tfds' own random-access reader)."""
  source = builder.as_data_source(split)
  return {ex["file_name"].decode(): ex for ex in (source[i] for i in range(len(source)))}



# A folder dataset (semflow_jax/data/folder.py): train/ and validation/ with images/ and labels/,
# a classes.json; class c is painted in blocks, and the image's red channel is 40 x the class
# (so a model can learn it), with an ignore (255) region in every label map.
FOLDER_CLASSES = ("background", "road", "car", "tree", "sky")
FOLDER_SIZES = ((40, 48), (36, 36), (48, 40))  # (H, W), cycled


def write_folder_dataset(root, splits=(("train", 8), ("validation", 4)), seed=0,
                         classes=FOLDER_CLASSES, extra=None):
  """{split: [(name, image path, label path, label)]}; `extra` is merged into classes.json.
  With splits=(("", n),) the examples go straight into images/ and labels/."""
  import json
  rng = np.random.default_rng(seed)
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, "classes.json"), "w") as f:
    json.dump({"classes": list(classes), **(extra or {})}, f)
  out = {}
  n = 0
  for split, count in splits:
    out[split] = []
    for _ in range(count):
      h, w = FOLDER_SIZES[n % len(FOLDER_SIZES)]
      block = 6
      ids = rng.integers(0, len(classes), (h // block + 1, w // block + 1))
      label = np.kron(ids, np.ones((block, block), np.int64))[:h, :w].astype(np.uint8)
      label[:5, :7] = 255  # the ignore region
      image = np.stack([40 * np.minimum(label, 5) + 20, rng.integers(0, 255, (h, w)),
                        np.full((h, w), 90)], -1).astype(np.uint8)
      name = f"scene_{n:03d}"
      ext = ".jpg" if n % 3 == 2 else ".png"  # JPEGs and PNGs side by side
      image_path = _save(os.path.join(root, split, "images", name + ext), image,
                         **({"quality": 95} if ext == ".jpg" else {}))
      label_path = _save(os.path.join(root, split, "labels", name + ".png"), label)
      out[split].append((name, image_path, label_path, label))
      n += 1
  return out
