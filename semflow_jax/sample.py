"""Segment, synthesise and edit with a trained checkpoint from a workdir (or an ensemble of
several), including the controls of `controls.py` (style reference, regional re-sampling, editing
through the label map).

`Predictor` is the model loaded once, working on arrays (the file CLI, `sample_many` and the
studio all call it): one image or label map of any size (`segment`, `synthesize`, ...), or one
batch of this process's rows at the model's size (`segment_rows`, `synthesize_rows`: sharded
over every device of every process). The `*_file` functions read and write one file around it
(`image_files`); `sample_many` runs whole folders and dataset splits. Inputs of any size are
resized to the model's resolution as the input pipeline resizes a dataset's examples
(`resize.image` for images, `resize.labels` for label maps) and outputs come back at the input's
size (label maps by nearest neighbour at pixel centres, exactly as evaluation scores them).
Sample i of a seed is drawn with its own key (`example_keys`), so it does not depend on how many
samples are asked for. Bad input raises `image_files.InputError`, whose one-line message names
the file and the problem.
"""

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from semflow_jax import anchors, controls, image_files, images, parallel, resize, state, storage
from semflow_jax.image_files import InputError, check_output
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow


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
    # On the mesh, laid out as training lays them out (state.model_param_shardings): a no-op
    # for restored parameters, and the same layout for any others.
    self.params = jax.device_put(params, state.model_param_shardings(params, self.mesh, config))
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
    small = resize.labels(np.asarray(labels, np.uint8), self.model.image_size)
    return jnp.broadcast_to(jnp.asarray(small)[None], (num_samples, *small.shape))

  def _images_out(self, x, size) -> np.ndarray:
    out = np.asarray(self.programs.to_uint8(x))
    return np.stack([resize.image(image, size) for image in out])

  def segment(self, image: np.ndarray, steps: Optional[int] = None,
              sampler: Optional[str] = None) -> np.ndarray:
    """uint8 (H, W, 3) photo -> uint8 (H, W) class ids."""
    steps, sampler = self._sampler(steps, sampler, self.config.sample.seg_steps)
    small = resize.image(image, self.model.image_size)
    labels = np.asarray(self.programs.segment(steps, sampler)(self.params, small[None]))[0]
    return resize.labels(labels.astype(np.uint8), image.shape[:2])

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
    labels = self.programs.segment(steps, sampler)(self.params, batch)
    return parallel.local_rows(labels).astype(np.uint8)

  def synthesize_rows(self, labels: np.ndarray, keys: np.ndarray, steps: Optional[int] = None,
                      sampler: Optional[str] = None) -> np.ndarray:
    """This process's rows of one batch: uint8 (b, h, w) class ids at the model's size and one
    perturbation key per row (b, 2) -> uint8 (b, h, w, 3) images."""
    steps, sampler = self._sampler(steps, sampler, self.config.sample.synth_steps)
    batch, batch_keys = self._global(labels, keys)
    out = self.programs.synthesize(steps, sampler)(self.params, batch, batch_keys)
    return parallel.local_rows(self.programs.to_uint8(out))

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
                        strength: Optional[float] = None, colour_transfer: bool = False, refine: int = 0,
                        seed: Optional[int] = None, steps: Optional[int] = None,
                        sampler: Optional[str] = None) -> np.ndarray:
    """`synthesize` in the style of the uint8 (h, w, 3) `reference` (controls.synthesize_styled;
    strength 1 is plain synthesis, 0 the reference)."""
    steps, sampler = self._sampler(steps, sampler, self.config.sample.synth_steps)
    strength = DEFAULT_STYLE_STRENGTH if strength is None else float(strength)
    reference = resize.image(reference, self.model.image_size)
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
    region = resize.labels(np.asarray(region).astype(np.uint8),
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
    small = resize.image(photo, self.model.image_size)
    source = np.asarray(self.programs.segment(seg_steps, seg_sampler)(self.params, small[None]))[0]
    source = source.astype(np.uint8)
    # The region is found at the photo's size, against the label map `segment` returns, so
    # resizing never invents an edit; a model-size pixel is edited if any of its pixels is.
    changed = (edited_labels != resize.labels(source, photo.shape[:2])) & (
        edited_labels != anchors.IGNORE_LABEL)
    region = resize.region(changed, self.model.image_size)
    target = np.where(region, resize.labels(np.asarray(edited_labels, np.uint8),
                                            self.model.image_size), source)
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
  image = image_files.read_image(input_path)
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
  labels = image_files.read_label_map(input_path, config.data.num_classes)
  reference = image_files.read_image(style) if style else None
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


def _resample_region(labels: np.ndarray, labels_path: str, classes: Optional[Sequence[str]],
                     mask_path: Optional[str], num_classes: int) -> np.ndarray:
  """bool (H, W) at the label map's size: pixels of `classes`, or the nonzero pixels of the
  mask PNG `mask_path`."""
  if classes is not None and mask_path is not None:
    raise InputError("give --resample_classes or --resample_mask, not both")
  if mask_path is not None:
    mask = image_files.read_mask(mask_path)
    if mask.shape != labels.shape:
      raise InputError(f"{mask_path}: mask is {mask.shape[0]}x{mask.shape[1]}, the label map "
                       f"{labels_path} is {labels.shape[0]}x{labels.shape[1]}")
    return mask
  ids = []
  for c in classes or ():
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
  photo = image_files.read_image(input_path)
  edited = image_files.read_label_map(labels_path, config.data.num_classes)
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
