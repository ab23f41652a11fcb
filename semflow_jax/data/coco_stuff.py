"""`coco_stuff`: COCO-Stuff-164k semantic segmentation, 171 classes (80 things + 91 stuff).

Download (manual: COCO images are under Flickr terms, the stuff labels under CC BY 4.0):
  http://images.cocodataset.org/zips/train2017.zip
  http://images.cocodataset.org/zips/val2017.zip
  http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip
and unpack so that the manual directory holds

  <manual_dir>/train2017/000000000009.jpg ...                    (118,287 JPEGs)
  <manual_dir>/val2017/000000000139.jpg ...                      (5,000 JPEGs)
  <manual_dir>/stuffthingmaps_trainval2017/train2017/000000000009.png ...
  <manual_dir>/stuffthingmaps_trainval2017/val2017/000000000139.png ...

(`unzip stuffthingmaps_trainval2017.zip -d <manual_dir>/stuffthingmaps_trainval2017`).

Build:
  python -m semflow_jax.data.build coco_stuff --manual_dir=<manual_dir> --data_dir=<tfds dir> \
      [--processes=8]
(in parallel shards, see build.py), or let `pipeline.get_builder` build it when
`config.data.manual_dir` is set. Stored as ArrayRecord for random access, in file-name order.

Label maps hold the COCO category id minus one (0 = person ... 181 = wood) and 255 for
unlabelled pixels. The 11 thing ids that COCO defines but never annotates drop out, leaving 171
contiguous classes in id order (raw 12 'stop sign' -> 11, raw 181 'wood' -> 170); 255 stays
ignore; any other value is an error. Images are stored as the original JPEG bytes.
Splits: train (train2017), validation (val2017).
"""

import tensorflow_datasets as tfds

from semflow_jax.data import manual

# COCO category names by raw label value (category id - 1); None marks the 11 ids COCO
# reserves but never annotates (street sign, hat, shoe, eye glasses, plate, mirror, window,
# desk, door, blender, hair brush).
RAW_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", None, "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", None, "backpack",
    "umbrella", None, None, "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard",
    "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", None, "wine glass", "cup", "fork", "knife", "spoon", "bowl",
    "banana", "apple", "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut",
    "cake", "chair", "couch", "potted plant", "bed", None, "dining table", None, None, "toilet",
    None, "tv", "laptop", "mouse", "remote", "keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", None, "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush", None,
    # stuff, raw 91..181
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill", "house",
    "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud", "napkin", "net",
    "paper", "pavement", "pillow", "plant-other", "plastic", "platform", "playingfield",
    "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad", "sand", "sea",
    "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone", "straw",
    "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
)
CLASS_NAMES = tuple(name for name in RAW_NAMES if name is not None)
NUM_CLASSES = len(CLASS_NAMES)  # 171
RAW_TO_CLASS = {raw: CLASS_NAMES.index(name) for raw, name in enumerate(RAW_NAMES)
                if name is not None}
RAW_TO_CLASS[manual.IGNORE] = manual.IGNORE
_TABLE = manual.lookup_table(RAW_TO_CLASS)

LABEL_DIR = "stuffthingmaps_trainval2017"
SPLITS = {"train": "train2017", "validation": "val2017"}


class CocoStuff(manual.ManualDownloadBuilder):
  """COCO-Stuff-164k: COCO 2017 images with 171-class stuff+thing label maps."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "ArrayRecord (random access), examples in file-name order."}

  def items_under(self, root):
    return self.paired_folders(root, SPLITS, ("", ".jpg"), (LABEL_DIR, ".png"))

  def load_example(self, item):
    return manual.load_pair(item, _TABLE)

  def _info(self):
    return manual.dataset_info(self, "jpeg", "https://github.com/nightrome/cocostuff", CLASS_NAMES)
