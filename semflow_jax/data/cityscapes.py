"""`cityscapes_semantic`: Cityscapes fine annotations as 19 train ids, images at 2048x1024.

Download (manual: registration at https://www.cityscapes-dataset.com/ and its licence):
  leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip
and unpack both into the manual directory, so that it holds

  <manual_dir>/leftImg8bit/train/aachen/aachen_000000_000019_leftImg8bit.png ...
  <manual_dir>/leftImg8bit/val/frankfurt/frankfurt_000000_000294_leftImg8bit.png ...
  <manual_dir>/gtFine/train/aachen/aachen_000000_000019_gtFine_labelIds.png ...
  <manual_dir>/gtFine/val/frankfurt/frankfurt_000000_000294_gtFine_labelIds.png ...

(the other gtFine files, *_color.png, *_instanceIds.png, *_polygons.json, are not read).

Build:
  python -m semflow_jax.data.build cityscapes_semantic --manual_dir=<manual_dir> \
      --data_dir=<tfds dir> [--processes=8]
(in parallel shards, see build.py), or let `pipeline.get_builder` build it when
`config.data.manual_dir` is set. Stored as ArrayRecord for random access, in <city>/<frame> order.

`*_gtFine_labelIds.png` holds the 34 label ids of the official table; they map to the 19
evaluation train ids with every other id -> 255 (ignore), exactly as
`cityscapesscripts.helpers.labels` says (tests check against that package). License plates
(id -1) are never drawn into labelIds images; a 255, the uint8 form of -1, is accepted as that
id and maps to ignore. Images are stored as the original PNG bytes, full size.
Splits: train (2,975 images), validation (val, 500).
"""

import tensorflow_datasets as tfds

from semflow_jax.data import manual

# (name, label id, train id) of the official label table (cityscapesscripts.helpers.labels);
# train id 255 or -1 means ignored in training and evaluation.
LABELS = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8),
    ("terrain", 22, 9), ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13),
    ("truck", 27, 14), ("bus", 28, 15), ("caravan", 29, 255), ("trailer", 30, 255),
    ("train", 31, 16), ("motorcycle", 32, 17), ("bicycle", 33, 18), ("license plate", -1, -1),
)
CLASS_NAMES = tuple(name for name, _, train_id in sorted(LABELS, key=lambda l: l[2])
                    if 0 <= train_id < manual.IGNORE)
NUM_CLASSES = len(CLASS_NAMES)  # 19
# Raw uint8 value -> train id; -1 wraps to 255 in a uint8 image.
RAW_TO_CLASS = {label_id % 256: train_id if 0 <= train_id < manual.IGNORE else manual.IGNORE
                for _, label_id, train_id in LABELS}
_TABLE = manual.lookup_table(RAW_TO_CLASS)

SPLITS = {"train": "train", "validation": "val"}
IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


class CityscapesSemantic(manual.ManualDownloadBuilder):
  """Cityscapes gtFine semantic labels (19 train ids) with the leftImg8bit images."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "ArrayRecord (random access), examples in <city>/<frame> order."}

  def items_under(self, root):
    # Keys are <city>/<city>_<sequence>_<frame>, the part both file names share.
    return self.paired_folders(root, SPLITS, ("leftImg8bit", IMAGE_SUFFIX),
                               ("gtFine", LABEL_SUFFIX), recursive=True)

  def load_example(self, item):
    return manual.load_pair(item, _TABLE)

  def _info(self):
    return manual.dataset_info(self, "png", "https://www.cityscapes-dataset.com/", CLASS_NAMES)
