"""Segment, synthesise and edit: one file, a folder of files or a dataset split, with a trained
checkpoint from a workdir (or an ensemble of several), including the controls of `controls.py`
(style reference, regional re-sampling, editing through the label map).

`Predictor` is the model loaded once, working on arrays (the studio uses it too): one image or
label map of any size (`segment`, `synthesize`, ...), or one batch of this process's rows at the
model's size (`segment_rows`, `synthesize_rows`: sharded over every device of every process).
The `*_file` functions read and write one file around it; `segment_many` / `synthesize_many` a
whole folder (or glob) or a split of the config's dataset in one process, compiled once, in
batches, resumable (inputs whose outputs exist are skipped). Inputs of any size are resized to
the model's resolution as the input pipeline resizes a dataset's examples (antialiased bicubic
for images, nearest for label maps) and outputs come back at the input's size (label maps by
nearest neighbour at pixel centres, exactly as evaluation scores them). Sample i of a seed is
drawn with its own key (`example_keys`), so it does not depend on how many samples are asked
for. Bad input raises `InputError`, whose one-line message names the file and the problem.
"""

import concurrent.futures
import dataclasses
import functools
import io
import math
import os
import posixpath
import time
import zlib
from typing import Callable, Iterator, List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from semflow_jax import anchors, controls, images, metrics, parallel, state, storage
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow


class InputError(ValueError):
  """A user-supplied file is missing, unreadable or not what the mode needs."""


def _open(path: str) -> Image.Image:
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
  return np.asarray(_open(path).convert("RGB"))


def read_label_map(path: str, num_classes: int) -> np.ndarray:
  """A single-channel PNG of class ids (255 = ignore) -> uint8 (H, W)."""
  return label_map_from_image(_open(path), path, num_classes)


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


def _resize(array: np.ndarray, size, resample) -> np.ndarray:
  """(H, W[, C]) uint8 -> (size[0], size[1][, C])."""
  if array.shape[:2] == tuple(size):
    return array
  return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def image_to_size(image: np.ndarray, size) -> np.ndarray:
  """uint8 (H, W, 3) -> (size[0], size[1], 3), antialiased bicubic as the input pipeline resizes
  (images.resize_image): into the model and out of it."""
  return images.resize_image(np.asarray(image, np.uint8), tuple(size))


def labels_to_size(labels: np.ndarray, size) -> np.ndarray:
  """(H, W) class ids -> uint8 (size[0], size[1]), nearest neighbour at pixel centres: the
  resize evaluation scores predictions with (metrics.resize_nearest)."""
  labels = np.asarray(labels, np.uint8)
  if labels.shape[:2] == tuple(size):
    return labels
  return metrics.resize_nearest(labels, int(size[0]), int(size[1]))


def _load(config, workdir, ensemble=()):
  """(model, params, mesh); with `ensemble` workdirs, the ensemble of `workdir` and those (each
  one's latest checkpoint; the velocity is their mean, see controls.ensemble)."""
  mesh = parallel.make_mesh(config)
  # In order, each once: `run/`, `run` and `./run` are one member.
  workdirs = list(dict.fromkeys(storage.resolve(w) for w in [workdir, *ensemble]))
  members = []
  for directory in workdirs:
    params, step = state.load_params(config, directory, mesh)
    logging.info("loaded checkpoint at step %d from %s", step, directory)
    members.append(params)
  if len(members) == 1:
    return SemFlow.from_config(config, mesh), members[0], mesh
  try:
    params = controls.ensemble(members, workdirs)
  except ValueError as e:
    raise InputError(str(e)) from None
  logging.info("ensemble of %d checkpoints: the velocity is their mean", len(members))
  return SemFlow.from_config(config, mesh), params, mesh


@jax.jit
def _example_keys(seed_key, indices):
  return jax.vmap(lambda i: jax.random.fold_in(seed_key, i))(indices)


def example_keys(seed: int, num_samples: int):
  """One perturbation key per sample: sample i of a seed is the same however many are drawn."""
  return _example_keys(jax.random.PRNGKey(seed), jnp.arange(num_samples))


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order (its own inputs)."""
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


class Predictor:
  """A trained model (or an ensemble) loaded once with its programs, working on arrays of any
  size: inputs are resized to the model's resolution (bicubic images, nearest label maps) and
  outputs come back at the input's size. The file CLI below and the studio both call it, so
  the same seed gives the same pixels everywhere.

  Batches (`segment_rows`, `synthesize_rows`) hold this process's rows of one global batch at
  the model's size, laid out over every device of `mesh` (every process calls together);
  `batch_rows(n)` is how many rows a process passes when the largest process has n to do.

  Sampling settings default to `config.sample` (seg_steps, synth_steps, method, seed).
  """

  def __init__(self, config: ml_collections.ConfigDict, model: SemFlow, params,
               programs: Optional[Programs] = None, mesh=None, classes=None):
    self.config, self.model = config, model
    self.mesh = mesh if mesh is not None else parallel.make_mesh(config)
    # On the mesh, laid out as training lays them out (replicated unless FSDP-sized): a no-op
    # for restored parameters, and the same layout for any others.
    self.params = jax.device_put(params, parallel.state_shardings(params, self.mesh, config))
    self.programs = programs or Programs(model)
    self._classes = classes

  @classmethod
  def load(cls, config: ml_collections.ConfigDict, workdir: str, ensemble=()) -> "Predictor":
    """From the latest checkpoint in `workdir` (with `ensemble` workdirs: their mean velocity)."""
    model, params, mesh = _load(config, workdir, ensemble)
    return cls(config, model, params, mesh=mesh)

  @property
  def num_classes(self) -> int:
    return self.model.num_classes

  @property
  def classes(self):
    """The dataset's class names and preview colours (data/classes.py), for legends."""
    if self._classes is None:
      from semflow_jax.data import classes
      try:
        self._classes = classes.of(self.config.data)
      except (ValueError, OSError) as e:  # e.g. a folder dataset's classes.json out of reach
        logging.warning("class names unavailable (%s); legends show class ids only", e)
        self._classes = classes.Classes(tuple(f"class_{i}" for i in range(self.num_classes)))
    return self._classes

  def _sampler(self, steps, sampler, default_steps):
    s = self.config.sample
    return int(steps if steps is not None else default_steps), sampler or s.method

  def _labels_batch(self, labels: np.ndarray, num_samples: int):
    small = labels_to_size(labels, self.model.image_size)
    return jnp.broadcast_to(jnp.asarray(small)[None], (num_samples, *small.shape))

  def _images_out(self, x, size) -> np.ndarray:
    out = np.asarray(self.programs.to_uint8(x))
    return np.stack([image_to_size(image, size) for image in out])

  def segment(self, image: np.ndarray, steps: Optional[int] = None,
              sampler: Optional[str] = None) -> np.ndarray:
    """uint8 (H, W, 3) photo -> uint8 (H, W) class ids."""
    steps, sampler = self._sampler(steps, sampler, self.config.sample.seg_steps)
    small = image_to_size(image, self.model.image_size)
    labels = np.asarray(self.programs.segment(steps, sampler)(self.params, small[None]))[0]
    return labels_to_size(labels, image.shape[:2])

  # -- batches over the devices (folders and splits) -------------------------------------------
  def batch_rows(self, most: int) -> int:
    """Rows per process per batch: `config.eval.batch_size` (the inference batch) rounded up to
    a multiple of the devices, or less when the busiest process has only `most` rows to do."""
    devices = self.mesh.devices.size
    per_process_devices = max(1, devices // jax.process_count())
    full = -(-self.config.eval.batch_size // devices) * devices // jax.process_count()
    needed = -(-max(1, most) // per_process_devices) * per_process_devices
    return min(full, needed)

  def _global(self, *arrays):
    sharding = parallel.batch_sharding(self.mesh)
    return [jax.make_array_from_process_local_data(sharding, np.asarray(a)) for a in arrays]

  def segment_rows(self, images: np.ndarray, steps: Optional[int] = None,
                   sampler: Optional[str] = None) -> np.ndarray:
    """This process's rows of one batch, uint8 (b, h, w, 3) at the model's size (every process
    calls together, b = `batch_rows`) -> uint8 (b, h, w) class ids."""
    steps, sampler = self._sampler(steps, sampler, self.config.sample.seg_steps)
    (batch,) = self._global(images)
    return _local_rows(self.programs.segment(steps, sampler)(self.params, batch)).astype(np.uint8)

  def synthesize_rows(self, labels: np.ndarray, keys: np.ndarray, steps: Optional[int] = None,
                      sampler: Optional[str] = None) -> np.ndarray:
    """This process's rows of one batch: uint8 (b, h, w) class ids at the model's size and one
    perturbation key per row (b, 2) -> uint8 (b, h, w, 3) images."""
    steps, sampler = self._sampler(steps, sampler, self.config.sample.synth_steps)
    batch, batch_keys = self._global(labels, keys)
    out = self.programs.synthesize(steps, sampler)(self.params, batch, batch_keys)
    return _local_rows(self.programs.to_uint8(out))

  # -- one input ---------------------------------------------------------------------------------
  def synthesize(self, labels: np.ndarray, num_samples: int, seed: Optional[int] = None,
                 steps: Optional[int] = None, sampler: Optional[str] = None) -> np.ndarray:
    """uint8 (H, W) class ids -> uint8 (num_samples, H, W, 3) images."""
    steps, sampler = self._sampler(steps, sampler, self.config.sample.synth_steps)
    keys = example_keys(self._seed(seed), num_samples)
    out = self.programs.synthesize(steps, sampler)(self.params,
                                                   self._labels_batch(labels, num_samples), keys)
    return self._images_out(out, labels.shape)

  def synthesize_styled(self, labels: np.ndarray, reference: np.ndarray, num_samples: int,
                        strength: float = None, colour_transfer: bool = False, refine: int = 0,
                        seed: Optional[int] = None, steps: Optional[int] = None,
                        sampler: Optional[str] = None) -> np.ndarray:
    """`synthesize` in the style of the uint8 (h, w, 3) `reference` (controls.synthesize_styled;
    strength 1 is plain synthesis, 0 the reference)."""
    steps, sampler = self._sampler(steps, sampler, self.config.sample.synth_steps)
    strength = DEFAULT_STYLE_STRENGTH if strength is None else float(strength)
    reference = image_to_size(reference, self.model.image_size)
    references = jnp.broadcast_to(jnp.asarray(reference)[None], (num_samples, *reference.shape))
    run = self.programs.synthesize_styled(strength, steps, sampler, colour_transfer, refine)
    out = run(self.params, self._labels_batch(labels, num_samples), references,
              example_keys(self._seed(seed), num_samples))
    return self._images_out(out, labels.shape)

  def resample(self, labels: np.ndarray, region: np.ndarray, num_samples: int,
               seed: Optional[int] = None, new_seed: Optional[int] = None,
               steps: Optional[int] = None, sampler: Optional[str] = None) -> np.ndarray:
    """Sample i of `synthesize(labels, num_samples, seed)` with new perturbation noise (from
    `new_seed`, default seed + 1) in the bool (H, W) `region` only (controls.resample)."""
    steps, sampler = self._sampler(steps, sampler, self.config.sample.synth_steps)
    seed = self._seed(seed)
    new_seed = seed + 1 if new_seed is None else int(new_seed)
    region = labels_to_size(np.asarray(region).astype(np.uint8),
                            self.model.image_size).astype(bool)
    regions = jnp.broadcast_to(jnp.asarray(region)[None], (num_samples, *region.shape))
    out = self.programs.resample(steps, sampler)(
        self.params, self._labels_batch(labels, num_samples), regions,
        example_keys(seed, num_samples), example_keys(new_seed, num_samples))
    return self._images_out(out, labels.shape)

  def edit(self, photo: np.ndarray, edited_labels: np.ndarray, edit_method: str = "blend",
           steps: Optional[int] = None, sampler: Optional[str] = None,
           seg_steps: Optional[int] = None):
    """Edit the uint8 (H, W, 3) `photo` through its label map: `edited_labels` (H, W) is its
    segmentation (`segment(photo, seg_steps, sampler)`) with some labels changed (255 = leave as
    is). Returns (the edited photo, uint8 (H, W, 3); how many model-resolution pixels were
    edited)."""
    if edit_method not in EDIT_METHODS:
      raise InputError(f"edit method {edit_method!r}: expected one of {', '.join(EDIT_METHODS)}")
    seg_steps, seg_sampler = self._sampler(seg_steps, sampler, self.config.sample.seg_steps)
    steps, sampler = self._sampler(steps, sampler, self.config.sample.synth_steps)
    small = image_to_size(photo, self.model.image_size)
    source = np.asarray(self.programs.segment(seg_steps, seg_sampler)(self.params, small[None]))[0]
    source = source.astype(np.uint8)
    # The region is found at the photo's size, against the label map `segment` returns, so
    # resizing never invents an edit; a model-size pixel is edited if any of its pixels is.
    changed = (edited_labels != labels_to_size(source, photo.shape[:2])) & (
        edited_labels != anchors.IGNORE_LABEL)
    region = _resize(changed.astype(np.uint8) * 255, self.model.image_size,
                     Image.Resampling.BOX) > 0
    target = np.where(region, labels_to_size(edited_labels, self.model.image_size), source)
    out = self.programs.edit(steps, sampler, edit_method == "blend")(
        self.params, small[None], source[None], target[None])
    return self._images_out(out, photo.shape[:2])[0], int(region.sum())

  def _seed(self, seed) -> int:
    return int(self.config.sample.seed if seed is None else seed)


def segment_file(config: ml_collections.ConfigDict, workdir: str, input_path: str,
                 output_path: str, ensemble=()) -> np.ndarray:
  """Write the label map of `input_path` to `output_path` and a preview beside it
  (`<name>_preview.png`: the colourised map with a legend of the classes in it)."""
  output_path = check_output(output_path, "the label map PNG of one image", directory=False)
  image = read_image(input_path)
  predictor = Predictor.load(config, workdir, ensemble)
  labels = predictor.segment(image)
  images.write_png(output_path, labels)
  preview = storage.join(storage.parent(output_path),
                         storage.as_path(output_path).stem + "_preview.png")
  classes = predictor.classes
  images.write_png(preview, images.preview_with_legend(labels, classes.names, classes.colours))
  logging.info("wrote %s and %s", output_path, preview)
  return labels


def synthesize_file(config: ml_collections.ConfigDict, workdir: str, input_path: str,
                    output_dir: str, num_samples: int, ensemble=(), style: Optional[str] = None,
                    style_strength: Optional[float] = None, colour_transfer: bool = False,
                    refine: int = 0, resample_classes: Optional[Sequence[str]] = None,
                    resample_mask: Optional[str] = None,
                    resample_seed: Optional[int] = None) -> list:
  """Write `num_samples` images synthesised from the label map `input_path` into `output_dir`.

  With `style` (an image): in that image's style (controls.synthesize_styled; strength 1 is
  plain synthesis). With `resample_classes` (class ids) or `resample_mask` (a PNG, nonzero =
  re-sample): sample i is plain sample i with new perturbation noise (from `resample_seed`) in
  that region only (controls.resample).
  """
  output_dir = check_output(output_dir, "a directory of samples (sample_0.png, ...)",
                            directory=True)
  if num_samples < 1:
    raise InputError(f"--num_samples must be >= 1, got {num_samples}")
  s = config.sample
  resampling = resample_classes is not None or resample_mask is not None
  _check_style_flags(style, style_strength, colour_transfer, refine, resampling)
  if resample_seed is not None and not resampling:
    raise InputError("--resample_seed needs --resample_classes or --resample_mask")
  if resampling and (resample_seed if resample_seed is not None else s.seed + 1) == s.seed:
    raise InputError(f"--resample_seed={resample_seed} is config.sample.seed, the original "
                     "sample's: the re-sampled region would not change")
  labels = read_label_map(input_path, config.data.num_classes)
  reference = read_image(style) if style else None
  region = _resample_region(labels, input_path, resample_classes, resample_mask,
                            config.data.num_classes) if resampling else None
  predictor = Predictor.load(config, workdir, ensemble)
  if reference is not None:
    out = predictor.synthesize_styled(labels, reference, num_samples, style_strength,
                                      colour_transfer, refine)
  elif region is not None:
    out = predictor.resample(labels, region, num_samples, new_seed=resample_seed)
  else:
    out = predictor.synthesize(labels, num_samples)
  paths = []
  for i, x in enumerate(out):
    path = storage.join(output_dir, f"sample_{i}.png")
    images.write_png(path, x)
    paths.append(path)
  logging.info("wrote %d samples to %s", num_samples, output_dir)
  return paths


# The style-strength curve in benchmarks/RESULTS.md: lower t_s follows the reference's colours
# more and the mask less; 0.7 halves the colour-histogram distance to the reference.
DEFAULT_STYLE_STRENGTH = 0.7


def _check_style_flags(style, strength, colour_transfer, refine, resampling):
  if strength is not None and not 0.0 <= strength <= 1.0:
    raise InputError(f"--style_strength={strength} must be in [0, 1] (1 = plain synthesis, 0 = "
                     "the reference itself)")
  if not style and (strength is not None or colour_transfer or refine):
    raise InputError("--style_strength, --colour_transfer and --refine need --style=IMAGE")
  if refine < 0:
    raise InputError(f"--refine={refine} must be >= 0")
  if style and resampling:
    raise InputError("--style and --resample_classes/--resample_mask cannot be combined")


def _resample_region(labels, labels_path, classes, mask_path, num_classes) -> np.ndarray:
  """bool (H, W) at the label map's size: pixels of `classes`, or the nonzero pixels of the
  mask PNG `mask_path`."""
  if classes is not None and mask_path is not None:
    raise InputError("give --resample_classes or --resample_mask, not both")
  if mask_path is not None:
    mask = np.asarray(_open(mask_path).convert("L")) > 0
    if mask.shape != labels.shape:
      raise InputError(f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]}, the label map "
                       f"{labels_path} is {labels.shape[0]}x{labels.shape[1]}")
    return mask
  ids = []
  for c in classes:
    try:
      ids.append(int(c))
    except ValueError:
      raise InputError(f"--resample_classes: {c!r} is not a class id") from None
    if not 0 <= ids[-1] < num_classes:
      raise InputError(f"--resample_classes: class {ids[-1]} is outside the dataset's classes "
                       f"0..{num_classes - 1}")
  if not ids:
    raise InputError("--resample_classes is empty")
  return np.isin(labels, ids)


def edit_file(config: ml_collections.ConfigDict, workdir: str, input_path: str,
              labels_path: str, output_path: str, method: str = "blend", ensemble=()) -> np.ndarray:
  """Edit the photo `input_path` through its label map: `labels_path` is its segmentation
  (as --mode=segment writes it) with some labels changed (255 = leave as is). The region whose
  labels changed is re-drawn (controls.edit, `method` 'shift' or 'blend'); the result, at the
  photo's size, goes to `output_path`."""
  output_path = check_output(output_path, "the edited image PNG", directory=False)
  if method not in EDIT_METHODS:
    raise InputError(f"--edit_method={method!r}: expected one of {', '.join(EDIT_METHODS)}")
  if not labels_path:
    raise InputError("--labels is required for --mode=edit (the edited label map PNG)")
  photo = read_image(input_path)
  edited = read_label_map(labels_path, config.data.num_classes)
  if edited.shape != photo.shape[:2]:
    raise InputError(f"{labels_path}: label map is {edited.shape[0]}x{edited.shape[1]}, the photo "
                     f"{input_path} is {photo.shape[0]}x{photo.shape[1]}; edit the label map "
                     "--mode=segment wrote for it")
  predictor = Predictor.load(config, workdir, ensemble)
  result, edited_pixels = predictor.edit(photo, edited, method)
  if not edited_pixels:
    logging.warning("%s: no label differs from the photo's segmentation; nothing to edit",
                    labels_path)
  images.write_png(output_path, result)
  logging.info("wrote %s (%d pixels edited at the model's %dx%d)", output_path, edited_pixels,
               *predictor.model.image_size)
  return result


EDIT_METHODS = ("blend", "shift")


# -- whole folders and dataset splits ------------------------------------------------------------
GLOB_CHARACTERS = "*?["
LABELS_DIR = "labels"  # segment_many: class-id PNGs, the folder dataset's labels/ layout
PROGRESS_EVERY_S = 10.0


@dataclasses.dataclass(frozen=True)
class Item:
  """One input: `name` is where its outputs go (its path under the input folder, or under a
  glob's fixed part, without the extension; a split example's file name without it)."""
  name: str
  path: str = ""


def is_many(input_spec: Optional[str], split: Optional[str]) -> bool:
  """Does --input (a folder or a glob) or --split ask for many inputs in one run?"""
  return bool(split) or bool(input_spec) and (
      any(c in input_spec for c in GLOB_CHARACTERS) or storage.is_dir(input_spec))


def list_inputs(input_spec: str, extensions: Sequence[str]) -> List[Item]:
  """A folder (every file below it whose extension is in `extensions`) or a glob pattern (the
  files it matches) -> Items sorted by name; one line naming the problem if there are none or
  two inputs would write the same output."""
  if not input_spec:
    raise InputError("--input is required (a file, a folder or a glob), or --split")
  wildcards = [input_spec.index(c) for c in GLOB_CHARACTERS if c in input_spec]
  if wildcards:
    fixed = input_spec[:min(wildcards)]
    base = fixed[:fixed.rfind("/") + 1] if "/" in fixed else "."
    root = storage.as_path(base)
    found = [(os.fspath(p.relative_to(root)).replace(os.sep, "/"), os.fspath(p))
             for p in root.glob(input_spec[len(base):] if base != "." else input_spec)
             if p.is_file()]
  else:
    if not storage.is_dir(input_spec):
      raise InputError(f"{input_spec}: no such folder")
    found = [(relative, path) for relative, path in storage.files_under(input_spec)
             if posixpath.splitext(relative)[1].lower() in extensions
             and not posixpath.basename(relative).startswith(".")]
  items = {}
  for relative, path in found:
    name = posixpath.splitext(relative)[0]
    if name in items:
      raise InputError(f"{path}: {items[name].path} has the same name; their outputs would "
                       "overwrite each other")
    items[name] = Item(name, path)
  if not items:
    raise InputError(f"--input={input_spec}: no input files" + (
        "" if wildcards else f" (looked for {', '.join(extensions)})"))
  return [items[k] for k in sorted(items)]


class _Existing:
  """The files under an output folder, listed once (resuming skips inputs whose outputs are all
  there; each was written whole, under a temporary name and then moved into place)."""

  def __init__(self, root: str):
    self.root = root
    self.files = set()
    if storage.is_dir(root):
      self.files.update(relative for relative, _ in storage.files_under(root))

  def all_there(self, relatives) -> bool:
    return all(r in self.files for r in relatives)


class _Progress:
  """A log line every PROGRESS_EVERY_S seconds and at the end: done of total, rate, time left."""

  def __init__(self, what: str, unit: str, total: int, skipped: int):
    self.what, self.unit, self.total, self.skipped = what, unit, total, skipped
    self.done, self.start, self.last = 0, time.time(), time.time()
    self.logged = None

  def add(self, n: int, force: bool = False):
    self.done += n
    now = time.time()
    if force and self.done == 0:  # nothing was written: the summary says so
      return
    if (force and self.logged != self.done) or now - self.last >= PROGRESS_EVERY_S:
      self.last, self.logged = now, self.done
      rate = self.done / max(now - self.start, 1e-9)
      left = (f", about {(self.total - self.done) / rate:.0f} s left" if rate > 0 else "")
      logging.info("%s: %d of %d %s written%s, %.1f %s/s%s", self.what, self.done, self.total,
                   self.unit, f" ({self.skipped} already there)" if self.skipped else "", rate,
                   self.unit, left)


def _max_over_processes(n: int) -> int:
  if jax.process_count() == 1:
    return n
  from jax.experimental import multihost_utils
  return int(np.max(multihost_utils.process_allgather(np.asarray(n, np.int64))))


def _all_processes(flag: bool) -> bool:
  if jax.process_count() == 1:
    return flag
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.asarray(flag))))


@dataclasses.dataclass
class _Batch:
  rows: list              # one entry per real row (what `write` needs), the rest is padding
  arrays: tuple           # the program's inputs, this process's rows (padded)
  done: bool = False      # every row's outputs exist (split batches; the program is skipped)


def _run_batches(batches: Iterator[_Batch], compute: Callable, write: Callable,
                 progress: _Progress, pool: concurrent.futures.Executor) -> None:
  """Run the program on every batch (all processes together) and write each real row's
  outputs on `pool`, while the next batch is read."""
  writes = []
  for batch in batches:
    if batch.done:
      continue
    outputs = compute(*batch.arrays)
    writes += [pool.submit(write, row, out) for row, out in zip(batch.rows, outputs)]
    progress.add(len(batch.rows))
    for w in [w for w in writes if w.done()]:
      w.result()  # a failed write stops the run now
    writes = [w for w in writes if not w.done()]
  for w in writes:
    w.result()
  progress.add(0, force=True)


def _file_batches(rows: list, load: Callable, batch_rows: int, num_batches: int, shapes,
                  pool: concurrent.futures.Executor, failures: list) -> Iterator[_Batch]:
  """Batches of `rows` (this process's), read by `load` on `pool` one batch ahead; rows whose
  input cannot be read are left out and listed in `failures` as (row, message)."""
  def submit(k):
    return [(row, pool.submit(load, row)) for row in rows[k * batch_rows:(k + 1) * batch_rows]]
  pending = submit(0)
  for k in range(num_batches):
    loaded = []
    for row, future in pending:
      try:
        loaded.append(future.result())
      except InputError as e:
        logging.warning("skipped: %s", e)
        failures.append((row, str(e)))
    pending = submit(k + 1) if k + 1 < num_batches else []
    arrays = tuple(np.zeros((batch_rows, *shape), dtype) for shape, dtype in shapes)
    for i, (_, inputs) in enumerate(loaded):
      for array, value in zip(arrays, inputs):
        array[i] = value
    yield _Batch([row for row, _ in loaded], arrays)


def _finish(what: str, written: int, skipped: int, failures: list, output_dir: str) -> dict:
  """The summary; an InputError naming the first unreadable input if any (the others were
  written)."""
  messages = list(dict.fromkeys(message for _, message in failures))  # one per input
  if messages:
    more = (f" (and {len(messages) - 1} more inputs that could not be read, each in a warning "
            "above)" if len(messages) > 1 else "")
    raise InputError(f"{messages[0]}{more}; the other outputs are in {output_dir}")
  if written == 0 and skipped:
    logging.info("%s: the outputs of all %d inputs already exist in %s; nothing left to do",
                 what, skipped, output_dir)
    return {"written": 0, "skipped": skipped, "output": output_dir}
  logging.info("%s: wrote the outputs of %d inputs, skipped %d already there, in %s", what,
               written, skipped, output_dir)
  return {"written": written, "skipped": skipped, "output": output_dir}


def _split_source(config, workdir, ensemble, input_spec, split: str, predictor):
  """(builder, predictor, number of examples) for --split: the config's dataset (built when
  needed) and its split, checked, and the model (loaded unless given)."""
  from semflow_jax.data import pipeline
  if input_spec:
    raise InputError(f"--input={input_spec} and --split={split}: give one of them")
  builder = pipeline.get_builder(config.data)
  if split not in builder.info.splits:
    raise InputError(f"--split={split}: {config.data.name} has the splits "
                     f"{', '.join(sorted(builder.info.splits))}")
  predictor = predictor or Predictor.load(config, workdir, ensemble)
  return builder, predictor, builder.info.splits[split].num_examples


def _split_batches(predictor: Predictor, builder, split: str, keys, outputs_of: Callable,
                   existing: _Existing) -> Iterator[_Batch]:
  """This process's batches of a split, read as evaluation reads them (the whole frame resized
  to the model's input); rows are (name, native (H, W), model-size arrays). A batch whose
  outputs all exist on every process is marked done."""
  from semflow_jax.data import pipeline
  total = builder.info.splits[split].num_examples
  rows = predictor.batch_rows(math.ceil(total / jax.process_count()))
  has_names = "file_name" in builder.info.features
  for batch in pipeline.eval_batches(
      builder, split, rows, keys=("image", "label") + (("file_name",) if has_names else ()),
      preprocess=pipeline.Preprocess.from_config(predictor.config.data), native_labels=True):
    real = []
    for i in np.flatnonzero(batch["mask"] > 0):
      name = (posixpath.splitext(batch["file_name"][i].decode())[0] if has_names
              else f"{split}_{int(batch['index'][i]):06d}")
      real.append((name, tuple(int(v) for v in batch[pipeline.NATIVE_SIZE_KEY][i]), i))
    done = _all_processes(all(existing.all_there(outputs_of(name)) for name, _, _ in real))
    yield _Batch(real, tuple(batch[k] for k in keys), done)


def _name_keys(seed: int, names: Sequence[str], samples: Sequence[int]) -> np.ndarray:
  """Perturbation keys of (input name, sample index) rows: fold_in(fold_in(key(seed), crc32 of
  the name), i), so an input's samples do not depend on the other inputs, their order, the
  batch or the process count, and two inputs never share noise."""
  ids = np.asarray([zlib.crc32(n.encode()) & 0x7FFFFFFF for n in names], np.int32)
  return np.asarray(_row_keys(jax.random.PRNGKey(seed), jnp.asarray(ids),
                              jnp.asarray(np.asarray(samples, np.int32))))


@jax.jit
def _row_keys(seed_key, name_ids, samples):
  return jax.vmap(lambda n, i: jax.random.fold_in(jax.random.fold_in(seed_key, n), i))(
      name_ids, samples)


def _workers() -> int:
  return max(2, min(16, (os.cpu_count() or 2)))


def segment_many(config: ml_collections.ConfigDict, workdir: str, input_spec: Optional[str],
                 output_dir: str, ensemble=(), split: Optional[str] = None,
                 predictor: Optional[Predictor] = None) -> dict:
  """Segment every image of a folder (or glob), or every example of a split of the config's
  dataset (`split`), in one process: compiled once, in batches over every device (and every
  process, each its own inputs), resumable. Writes, for an input named n (its path under the
  folder without the extension):

    <output_dir>/labels/n.png          class ids at the input's size (255 never: every pixel
                                       gets a class); what --mode=synthesize and the folder
                                       dataset's labels/ read
    <output_dir>/labelIds/n.png        Cityscapes configs: label ids for cityscapesscripts'
                                       evalPixelLevelSemanticLabeling (CITYSCAPES_RESULTS=here)
    <output_dir>/stuffthingmaps/n.png  COCO-Stuff configs: the stuffthingmaps values

  Inputs whose outputs all exist are skipped; an unreadable input is skipped with a warning and
  the run ends with InputError naming it (after writing the others). Returns {'written',
  'skipped', 'output'}."""
  from semflow_jax.data import classes
  output_dir = check_output(output_dir, "a directory (labels/<name>.png for every input)",
                            directory=True)
  official = classes.official_format(config.data.name)
  folders = [LABELS_DIR] + ([official[0]] if official else [])

  def outputs_of(name):
    return [f"{folder}/{name}.png" for folder in folders]

  def write(row, labels):
    name, size = row[0], row[1]
    native = labels_to_size(labels, size)
    if official:  # the dataset's own ids first: labels/ last marks the input done
      images.write_png(storage.join(output_dir, official[0], name + ".png"), official[1][native])
    images.write_png(storage.join(output_dir, LABELS_DIR, name + ".png"), native)

  existing = _Existing(output_dir)
  if split:
    builder, predictor, total = _split_source(config, workdir, ensemble, input_spec, split,
                                              predictor)
    progress = _Progress(f"segment {split}", "images", total, 0)
    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
      batches = _split_batches(predictor, builder, split, ("image",), outputs_of, existing)
      _run_batches(batches, predictor.segment_rows, write, progress, pool)
    return _finish("segment", progress.done, total - progress.done, [], output_dir)

  items = list_inputs(input_spec, images.IMAGE_EXTENSIONS)
  mine = items[jax.process_index()::jax.process_count()]
  todo = [it for it in mine if not existing.all_there(outputs_of(it.name))]
  most = _max_over_processes(len(todo))
  if most == 0:  # a rerun with nothing left to do (on any process): no model to load
    return _finish("segment", 0, len(mine), [], output_dir)
  predictor = predictor or Predictor.load(config, workdir, ensemble)
  size = predictor.model.image_size
  batch_rows = predictor.batch_rows(most)

  def load(item):
    image = read_image(item.path)
    return (item.name, image.shape[:2]), (image_to_size(image, size),)

  failures = []
  progress = _Progress("segment", "images", len(todo), len(mine) - len(todo))
  with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
    batches = _file_batches(todo, load, batch_rows, math.ceil(most / batch_rows),
                            [((*size, 3), np.uint8)], pool, failures)
    _run_batches(batches, predictor.segment_rows, write, progress, pool)
  return _finish("segment", progress.done, len(mine) - len(todo), failures, output_dir)


def synthesize_many(config: ml_collections.ConfigDict, workdir: str, input_spec: Optional[str],
                    output_dir: str, num_samples: int, ensemble=(), split: Optional[str] = None,
                    predictor: Optional[Predictor] = None) -> dict:
  """Synthesise `num_samples` images from every label map of a folder (or glob; single-channel
  PNGs of class ids), or from every label map of a split of the config's dataset, in one
  process (compiled once, batched over every device and process, resumable). Sample i of the
  input named n is `<output_dir>/n_<i>.png` at the label map's size, drawn with the key
  (config.sample.seed, n, i): it does not depend on the other inputs or the batch. Returns
  {'written', 'skipped', 'output'} counted in inputs."""
  output_dir = check_output(output_dir, "a directory (<name>_<i>.png for every input)",
                            directory=True)
  if num_samples < 1:
    raise InputError(f"--num_samples must be >= 1, got {num_samples}")
  seed = int(config.sample.seed)

  def outputs_of(name):
    return [f"{name}_{i}.png" for i in range(num_samples)]

  def write(row, image):
    name, size, i = row
    images.write_png(storage.join(output_dir, f"{name}_{i}.png"), image_to_size(image, size))

  existing = _Existing(output_dir)
  if split:
    builder, predictor, total = _split_source(config, workdir, ensemble, input_spec, split,
                                              predictor)
    progress = _Progress(f"synthesize {split}", "images", total * num_samples, 0)
    written = 0
    with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
      for batch in _split_batches(predictor, builder, split, ("label",), outputs_of, existing):
        if batch.done:
          continue
        labels = batch.arrays[0][..., 0]
        names = [name for name, _, _ in batch.rows] + [""] * (len(labels) - len(batch.rows))
        writes = []
        for i in range(num_samples):  # one program call per sample index, all examples
          out = predictor.synthesize_rows(labels, _name_keys(seed, names, [i] * len(names)))
          writes += [pool.submit(write, (name, size, i), out[row])
                     for name, size, row in batch.rows]
        for w in writes:
          w.result()
        written += len(batch.rows)
        progress.add(len(writes))
      progress.add(0, force=True)
    return _finish("synthesize", written, total - written, [], output_dir)

  items = list_inputs(input_spec, (".png",))
  mine = items[jax.process_index()::jax.process_count()]
  todo = [it for it in mine if not existing.all_there(outputs_of(it.name))]
  rows = [(item, i) for item in todo for i in range(num_samples)]
  most = _max_over_processes(len(rows))
  if most == 0:  # a rerun with nothing left to do (on any process): no model to load
    return _finish("synthesize", 0, len(mine), [], output_dir)
  keys = _name_keys(seed, [item.name for item, _ in rows], [i for _, i in rows]) if rows else []
  rows = [(item, i, key) for (item, i), key in zip(rows, keys)]
  predictor = predictor or Predictor.load(config, workdir, ensemble)
  size = predictor.model.image_size
  batch_rows = predictor.batch_rows(most)

  @functools.lru_cache(maxsize=None)  # each file read once for all its samples (rows in order)
  def read(item):
    labels = read_label_map(item.path, predictor.num_classes)
    return labels.shape, labels_to_size(labels, size)

  def load(row):
    item, i, key = row
    native_size, small = read(item)
    return (item.name, native_size, i), (small, key)

  failures = []
  progress = _Progress("synthesize", "images", len(rows), (len(mine) - len(todo)) * num_samples)
  with concurrent.futures.ThreadPoolExecutor(_workers()) as pool:
    batches = _file_batches(rows, load, batch_rows, math.ceil(most / batch_rows),
                            [(tuple(size), np.uint8), ((2,), np.uint32)], pool, failures)
    _run_batches(batches, predictor.synthesize_rows, write, progress, pool)
  failed = {row[0].name for row, _ in failures}
  return _finish("synthesize", len(todo) - len(failed), len(mine) - len(todo), failures,
                 output_dir)
