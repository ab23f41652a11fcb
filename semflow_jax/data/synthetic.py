"""`synthetic_scenes`: a built-in tfds dataset generated from a seed, no download.

Outdoor-like scenes with a sky/ground layout and objects whose colours overlap between classes
(grey sky, grey ground, grey building, grey cloud...), with shading, low-frequency texture and
pixel noise. Colour alone cannot segment them; shape and position can. Every example is a
function of (seed, split, index) only, so any example can be regenerated.

Because the generator is ours, one layout (label map) can be rendered with several appearances:
`image` and `image_alt` are two independent renderings of the same `label`. Their difference
measures how diverse real images of one mask are, the yardstick for synthesis diversity.

Built on first use (`pipeline.get_builder`; one process builds, others starting at the same time
wait for it), stored as ArrayRecord in index order for random access (`records.py`).
"""

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

from semflow_jax.data import records

CLASS_NAMES = ("sky", "ground", "sun", "cloud", "lake", "building", "tree")
NUM_CLASSES = len(CLASS_NAMES)
SKY, GROUND, SUN, CLOUD, LAKE, BUILDING, TREE = range(NUM_CLASSES)

# Base colours (RGB in [0, 1]) each class draws from, with probabilities. Every class has a
# usual colour and less frequent ones that it shares with other classes: light and dark blue in
# sky and lake, orange in sky, sun and tree, white in sun and cloud, grey in sky, cloud and
# building, sand in ground and building, green in ground and tree. So colour is a clue, not an
# answer: a per-pixel colour classifier gets about 0.6 mIoU; shape and position do the rest.
_GREY = (0.55, 0.55, 0.58)
_LIGHT_BLUE = (0.55, 0.74, 0.93)
_DARK_BLUE = (0.12, 0.17, 0.36)
_SAND = (0.84, 0.74, 0.52)
_ORANGE = (0.93, 0.58, 0.25)
_WHITE = (0.93, 0.93, 0.94)
_GREEN = (0.33, 0.58, 0.26)
CLASS_COLOURS = {
    SKY: ((_LIGHT_BLUE, 0.55), (_ORANGE, 0.15), (_DARK_BLUE, 0.15), (_GREY, 0.15)),
    GROUND: ((_GREEN, 0.5), ((0.52, 0.38, 0.24), 0.3), (_SAND, 0.2)),
    SUN: (((0.96, 0.86, 0.32), 0.6), (_WHITE, 0.2), (_ORANGE, 0.2)),
    CLOUD: ((_WHITE, 0.6), (_GREY, 0.25), ((0.93, 0.7, 0.72), 0.15)),
    LAKE: (((0.1, 0.28, 0.8), 0.6), (_LIGHT_BLUE, 0.2), (_DARK_BLUE, 0.2)),
    BUILDING: (((0.72, 0.2, 0.18), 0.6), (_GREY, 0.25), (_SAND, 0.15)),
    TREE: (((0.1, 0.35, 0.1), 0.7), (_GREEN, 0.15), (_ORANGE, 0.15)),
}
SPLIT_IDS = {"train": 0, "validation": 1}


@dataclasses.dataclass(frozen=True)
class Layout:
  """The label map and the instance map (one id per painted object, 0 = sky, 1 = ground)."""
  labels: np.ndarray     # uint8 (H, W)
  instances: np.ndarray  # int32 (H, W)
  instance_classes: tuple


def sample_layout(rng: np.random.Generator, size: int) -> Layout:
  """Horizon, then sun, clouds, a lake, buildings and trees painted in that order."""
  s = float(size)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
  horizon = (rng.uniform(0.35, 0.65) * s + rng.uniform(-0.15, 0.15) * (xx - s / 2)
             + rng.uniform(0, 0.05) * s * np.sin(xx / s * rng.uniform(2, 6) + rng.uniform(0, 6.3)))
  instances = np.where(yy < horizon, 0, 1).astype(np.int32)
  classes = [SKY, GROUND]
  h_mid = float(np.median(horizon))

  def paint(region, cls):
    if region.sum() >= 2:
      instances[region] = len(classes)
      classes.append(cls)  # pyright: ignore[reportAttributeAccessIssue]

  def ellipse(cx, cy, rx, ry):
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1.0

  if rng.uniform() < 0.6:
    r = rng.uniform(0.09, 0.17) * s
    paint(ellipse(rng.uniform(0.1, 0.9) * s, rng.uniform(0.08, 0.8) * h_mid, r, r) & (yy < horizon), SUN)
  for _ in range(rng.integers(0, 3)):
    paint(ellipse(rng.uniform(0, 1) * s, rng.uniform(0.1, 0.75) * h_mid, rng.uniform(0.12, 0.26) * s,
                  rng.uniform(0.05, 0.09) * s) & (yy < horizon), CLOUD)
  if rng.uniform() < 0.45:
    paint(ellipse(rng.uniform(0.15, 0.85) * s, rng.uniform(h_mid + 0.12 * s, 0.92 * s),
                  rng.uniform(0.15, 0.32) * s, rng.uniform(0.05, 0.1) * s) & (yy >= horizon), LAKE)
  for _ in range(rng.integers(0, 3)):
    w, h = rng.uniform(0.12, 0.28) * s, rng.uniform(0.18, 0.45) * s
    x0, bottom = rng.uniform(-0.05, 0.95) * s - w / 2, h_mid + rng.uniform(0.0, 0.12) * s
    paint((xx >= x0) & (xx < x0 + w) & (yy < bottom) & (yy >= bottom - h), BUILDING)
  for _ in range(rng.integers(0, 4)):
    w, h = rng.uniform(0.16, 0.32) * s, rng.uniform(0.25, 0.5) * s
    cx, base = rng.uniform(0.05, 0.95) * s, rng.uniform(h_mid + 0.05 * s, 1.0 * s)
    frac = (base - yy) / h  # 0 at the base, 1 at the tip
    paint((frac >= 0) & (frac <= 1) & (np.abs(xx - cx) <= (1 - frac) * w / 2), TREE)

  # Drop instances that later objects painted over entirely.
  present = np.unique(instances)
  remap = np.zeros(len(classes), np.int32)
  remap[present] = np.arange(len(present))
  instances = remap[instances]
  classes = tuple(classes[i] for i in present)
  labels = np.asarray(classes, np.uint8)[instances]
  return Layout(labels=labels, instances=instances, instance_classes=classes)


def _low_frequency_noise(rng, size, cells):
  """Smooth noise: a coarse random grid upsampled bilinearly to (size, size)."""
  grid = rng.normal(size=(cells + 1, cells + 1))
  coords = np.linspace(0, cells, size, dtype=np.float64)
  i0 = np.minimum(coords.astype(int), cells - 1)
  f = coords - i0
  rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]
  return rows[:, i0] * (1 - f)[None] + rows[:, i0 + 1] * f[None]


def render(layout: Layout, rng: np.random.Generator) -> np.ndarray:
  """One appearance of a layout: per-object colour, shading, texture and pixel noise -> uint8."""
  size = layout.labels.shape[0]
  yy, xx = (np.mgrid[0:size, 0:size].astype(np.float32) + 0.5) / size - 0.5
  image = np.zeros((size, size, 3), np.float32)
  for instance, cls in enumerate(layout.instance_classes):
    region = layout.instances == instance
    colours, weights = zip(*CLASS_COLOURS[cls])
    base = np.asarray(colours[rng.choice(len(colours), p=weights)]) + rng.uniform(-0.05, 0.05, 3)
    direction = rng.normal(size=2)
    shading = rng.uniform(0.03, 0.15) * (direction[0] * yy + direction[1] * xx) / np.linalg.norm(direction)
    texture = rng.uniform(0.02, 0.05) * _low_frequency_noise(rng, size, max(2, size // 6))
    colour = base[None, None] + (shading + texture)[..., None]
    image[region] = colour[region]
  image += rng.normal(0, 0.025, image.shape)
  return np.round(np.clip(image, 0, 1) * 255).astype(np.uint8)


def example_rngs(seed: int, split: str, index: int):
  """Independent generators for the layout and for the two appearances of one example."""
  root = np.random.SeedSequence([seed, SPLIT_IDS[split], index])
  return [np.random.default_rng(s) for s in root.spawn(3)]


def generate_example(seed: int, split: str, index: int, size: int) -> dict:
  layout_rng, appearance_rng, alt_rng = example_rngs(seed, split, index)
  layout = sample_layout(layout_rng, size)
  return {
      "image": render(layout, appearance_rng),
      "image_alt": render(layout, alt_rng),
      "label": layout.labels[..., None],
      "file_name": f"{split}_{index:06d}",
  }


class SyntheticScenesConfig(tfds.core.BuilderConfig):
  """Image size, split sizes and seed of the generated dataset."""

  def __init__(self, *, image_size: int = 32, num_train: int = 5000, num_validation: int = 500,
               seed: int = 0, **kwargs):
    kwargs.setdefault("name", f"{image_size}")
    kwargs.setdefault("description", f"{image_size}x{image_size}, seed {seed}")
    super().__init__(**kwargs)
    if image_size < 8:
      raise ValueError(f"synthetic_scenes image_size must be >= 8, got {image_size}")
    self.image_size = image_size
    self.num_train = num_train
    self.num_validation = num_validation
    self.seed = seed


class SyntheticScenes(records.RandomAccessBuilder):
  """Generated sky/ground scenes with overlapping class colours; see the module docstring."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "ArrayRecord files (random access), same examples."}
  LOAD_IN_THREADS = False  # numpy-bound generation: threads would only contend for the GIL
  BUILDER_CONFIGS = [SyntheticScenesConfig(image_size=32), SyntheticScenesConfig(image_size=64)]

  def _info(self):
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3)),
            "image_alt": tfds.features.Image(shape=(size, size, 3)),
            "label": tfds.features.Image(shape=(size, size, 1)),
            "file_name": tfds.features.Text(),
        }),
        description=__doc__,
        disable_shuffling=True,  # stored in index order: example i is generate_example(..., i)
    )

  def split_items(self, manual_dir):
    del manual_dir  # nothing to download
    cfg = self.builder_config
    return {"train": [("train", i) for i in range(cfg.num_train)],
            "validation": [("validation", i) for i in range(cfg.num_validation)]}

  def load_example(self, item):
    split, index = item
    cfg = self.builder_config
    return index, generate_example(cfg.seed, split, index, cfg.image_size)
