"""Datasets (tfds builders) and the input pipeline. Importing registers the builders:
`synthetic_scenes` (built in), `coco_stuff`, `cityscapes_semantic`, `celebamask_hq` (manual
downloads; each module's docstring has the download layout and the build command) and
`folder_dataset` (your own images and label maps, data/folder.py)."""

from semflow_jax.data import celebamask_hq  # noqa: F401
from semflow_jax.data import cityscapes  # noqa: F401
from semflow_jax.data import coco_stuff  # noqa: F401
from semflow_jax.data import folder  # noqa: F401
from semflow_jax.data import synthetic  # noqa: F401
