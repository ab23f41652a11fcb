"""The class names (and preview colours) of config.data's dataset, without building it: for the
legends of mask previews, the README's class-id tables and the official output formats.

  table = classes.of(config.data)   # table.names[i] is class i; table.colours: (K, 3) or None
"""

import dataclasses
from typing import Optional, Tuple

import numpy as np


@dataclasses.dataclass(frozen=True)
class Classes:
  names: Tuple[str, ...]
  colours: Optional[np.ndarray] = None  # uint8 (K, 3) preview colours, where the dataset has them


def of(data) -> Classes:
  """config.data's classes, `data.num_classes` of them ('class_<i>' where a dataset has no
  name for i). Reads the dataset's table, or a folder dataset's classes.json."""
  colours = None
  if data.name == "synthetic_scenes":
    from semflow_jax.data import synthetic
    names = synthetic.CLASS_NAMES
  elif data.name in ("coco_stuff", "cityscapes_semantic", "celebamask_hq"):
    import importlib
    module = {"coco_stuff": "coco_stuff", "cityscapes_semantic": "cityscapes",
              "celebamask_hq": "celebamask_hq"}[data.name]
    names = importlib.import_module(f"semflow_jax.data.{module}").CLASS_NAMES
  elif data.name == "folder_dataset":
    from semflow_jax.data import folder
    table = folder.read_classes(data.folder)
    names = table.names
    colours = None if table.colours is None else np.asarray(table.colours, np.uint8)
  else:
    names = ()
  k = int(data.num_classes)
  names = tuple(names[i] if i < len(names) else f"class_{i}" for i in range(k))
  if colours is not None and len(colours) != k:
    colours = None
  return Classes(names, colours)


def official_format(name: str) -> Optional[Tuple[str, np.ndarray]]:
  """(folder name, uint8[256] class id -> the dataset's own label value) for the datasets whose
  tools read their own ids: Cityscapes' labelIds (cityscapesscripts'
  evalPixelLevelSemanticLabeling) and COCO-Stuff's stuffthingmaps values; None for the others.
  255 (ignore) stays 255."""
  if name == "cityscapes_semantic":
    from semflow_jax.data import cityscapes as module
    folder = "labelIds"
  elif name == "coco_stuff":
    from semflow_jax.data import coco_stuff as module
    folder = "stuffthingmaps"
  else:
    return None
  table = np.full(256, 255, np.uint8)
  for raw, cls in module.RAW_TO_CLASS.items():
    if cls != 255:  # the inverse of the builder's table: one raw value per class
      table[cls] = raw
  return folder, table
