"""tf.data input pipelines: per-process split, epoch-seeded shuffle, crop, resize, flip, batches.

The training stream is a pure function of (seed, position): epoch e is shuffled with a seed
derived from (seed, e) and every crop and flip draws from a stateless seed of (seed, e, index),
so the iterator's whole state is the number of batches it has handed out. `TrainIterator.state()`
is that number (with the global batch size and seed it refers to); it goes into every
checkpoint, and a resumed run rebuilds the stream at the next unseen batch. The stream of global
batches does not depend on the number of processes: every process walks the same shuffled order
of (still encoded) examples and decodes, crops and resizes only its own rows of each global
batch, so a run on 2 hosts sees exactly the batches a run on 1 host sees. Evaluation reads a
disjoint part of the split per process and pads the last batch with masked examples so every
example counts once on any number of processes; it never crops (the whole image is resized to
the model's input, as the literature evaluates) and can deliver each label at its native size
besides, for scoring at the label's own resolution.

Examples are cached and shuffled still encoded (the JPEG/PNG bytes tfds stores) and decoded,
cropped and resized after the shuffle, in parallel. Every process therefore holds the training
split in memory at its encoded size (COCO-Stuff train: about 19 GB, Cityscapes 7 GB,
CelebAMask-HQ 2 GB; a TPU VM host has 100+ GB), and skipping to a resume position decodes
nothing.

`Preprocess` (from config.data) says how stored examples become model-sized; the default
(`crop='none'`) passes them through unchanged, which the synthetic dataset relies on.
"""

import dataclasses
import math
from typing import Iterator, Optional, Tuple

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from semflow_jax.data import synthetic

CROPS = ("none", "random", "center", "full")
LABEL_KEY = "label"
IMAGE_KEYS = ("image", "image_alt")  # resized bicubic; the label nearest; anything else as is


@dataclasses.dataclass(frozen=True)
class Preprocess:
  """How a stored example becomes model-sized: crop a window, resize it, (flip: see the iterator).

  crop: 'none' keeps the stored size (every example must have the same);
    'random' a random window with the output's aspect ratio whose side is U[crop_scale] times
    that of the largest such window (so (1, 1): the largest window at a random position, e.g. a
    random square across a landscape image);
    'center' the largest centred window with the output's aspect ratio;
    'full' the whole frame (stretched if the aspect ratios differ).
  Then bicubic (antialiased) resizing of images and nearest resizing of labels to image_size.
  """
  crop: str = "none"
  image_size: Optional[Tuple[int, int]] = None  # (H, W); required unless crop == 'none'
  crop_scale: Tuple[float, float] = (1.0, 1.0)

  def __post_init__(self):
    if self.crop not in CROPS:
      raise ValueError(f"config.data.crop={self.crop!r}: expected one of {', '.join(CROPS)}")
    if self.crop != "none" and (self.image_size is None or len(self.image_size) != 2
                                or min(self.image_size) < 1):
      raise ValueError(f"config.data.image_size={self.image_size!r}: crop {self.crop!r} needs "
                       "an output size (height, width)")
    low, high = self.crop_scale
    if not 0 < low <= high <= 1:
      raise ValueError(f"config.data.crop_scale={self.crop_scale!r}: expected 0 < min <= max "
                       "<= 1")

  @classmethod
  def from_config(cls, data: ml_collections.ConfigDict) -> "Preprocess":
    """From config.data: `crop` (default 'none'), `image_size` (int or (H, W)), `crop_scale`."""
    crop = data.get("crop", "none")
    size = data.get("image_size")
    if isinstance(size, int):
      size = (size, size)
    size = tuple(int(s) for s in size) if size is not None else None
    return cls(crop=crop, image_size=size if crop != "none" else None,
               crop_scale=tuple(data.get("crop_scale", (1.0, 1.0))))

  def for_eval(self) -> "Preprocess":
    """Evaluation sees the whole image: any crop becomes 'full' (the frame resized to the
    model's input, stretched if the aspect ratios differ), as the official SemFlow validation
    and the segmentation literature do; predictions are then scored at the label's native
    size (evaluate.py)."""
    return dataclasses.replace(self, crop="full") if self.crop in ("random", "center") else self


def get_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The tfds builder named by config.data.

  The synthetic dataset is generated on first use. A manual-download dataset that is not built
  yet is built from `config.data.manual_dir` when that is set (single-process runs only).
  """
  data_dir = data.tfds_data_dir or None
  if data.name == "synthetic_scenes":
    defaults = (data.num_train, data.num_validation, data.seed) == (5000, 500, 0)
    name = f"{data.image_size}" if defaults else \
        f"{data.image_size}_n{data.num_train}_{data.num_validation}_s{data.seed}"
    predefined = {c.name for c in synthetic.SyntheticScenes.BUILDER_CONFIGS}
    builder_config = name if name in predefined else synthetic.SyntheticScenesConfig(
        name=name, image_size=data.image_size, num_train=data.num_train,
        num_validation=data.num_validation, seed=data.seed)
    builder = synthetic.SyntheticScenes(config=builder_config, data_dir=data_dir)
    builder.download_and_prepare()
    return builder
  import semflow_jax.data  # noqa: F401  (registers the manual-download builders)
  builder = tfds.builder(data.name, data_dir=data_dir)
  if not builder.is_prepared():
    manual_dir = data.get("manual_dir")
    command = (f"python -m semflow_jax.data.build {data.name} --manual_dir=<dir> "
               f"--data_dir={builder.data_dir_root}")
    if not manual_dir:
      raise FileNotFoundError(
          f"dataset {data.name} is not built in {builder.data_dir_root}; build it with "
          f"`{command}` or set config.data.manual_dir to the unpacked download")
    if jax.process_count() > 1:
      raise FileNotFoundError(
          f"dataset {data.name} is not built in {builder.data_dir_root}; build it once before "
          f"a multi-process run: `{command}`")
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def class_names(builder, num_classes: int) -> list:
  """The dataset's class names (tfds metadata 'class_names', the synthetic scenes' table), or
  'class_<i>' where a dataset has none; always `num_classes` long."""
  names = None
  metadata = builder.info.metadata
  if metadata is not None and "class_names" in metadata:
    names = list(metadata["class_names"])
  elif builder.name == "synthetic_scenes":
    names = list(synthetic.CLASS_NAMES)
  names = names or []
  return [names[i] if i < len(names) else f"class_{i}" for i in range(num_classes)]


def _image_keys(builder, keys):
  return [k for k in keys if isinstance(builder.info.features[k], tfds.features.Image)]


def _load(builder, split: str, keys, decode: bool = True) -> tf.data.Dataset:
  decoders = None if decode else {k: tfds.decode.SkipDecoding()
                                  for k in _image_keys(builder, keys)}
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(add_tfds_id=False))
  return ds.map(lambda ex: {k: ex[k] for k in keys}, num_parallel_calls=tf.data.AUTOTUNE)


def _decoder(builder, keys):
  """Decodes the image features that `_load(..., decode=False)` left as bytes."""
  encoded = _image_keys(builder, keys)

  def decode(example):
    return {k: builder.info.features[k].decode_example(v) if k in encoded else v
            for k, v in example.items()}
  return decode


def _window(shape, out_size, crop: str, crop_scale, seed):
  """(top, left, height, width) of the crop window in an image of `shape`."""
  height, width = shape[0], shape[1]
  if crop == "full":
    return 0, 0, height, width
  aspect = out_size[1] / out_size[0]
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  side = tf.minimum(h, w / aspect)  # height of the largest window with the output's aspect
  scale_seed, top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  if crop == "random" and crop_scale[0] < crop_scale[1]:
    side *= tf.random.stateless_uniform([], scale_seed, crop_scale[0], crop_scale[1])
  elif crop == "random":
    side *= crop_scale[0]
  ch = tf.clip_by_value(tf.cast(tf.round(side), tf.int32), 1, height)
  cw = tf.clip_by_value(tf.cast(tf.round(side * aspect), tf.int32), 1, width)
  if crop == "random":
    top = tf.random.stateless_uniform([], top_seed, 0, height - ch + 1, dtype=tf.int32)
    left = tf.random.stateless_uniform([], left_seed, 0, width - cw + 1, dtype=tf.int32)
  else:
    top, left = (height - ch) // 2, (width - cw) // 2
  return top, left, ch, cw


def _resize(x, size, nearest: bool):
  def resize():
    if nearest:
      return tf.image.resize(x, size, method="nearest")
    y = tf.image.resize(tf.cast(x, tf.float32), size, method="bicubic", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(y), 0, 255), x.dtype)
  same = tf.reduce_all(tf.equal(tf.shape(x)[:2], size))
  return tf.ensure_shape(tf.cond(same, lambda: x, resize), (*size, x.shape[-1]))


def _transform(example, seed, preprocess: Preprocess, flip: bool):
  """The same crop, resize and flip for every image and the label of one example."""
  spatial = [k for k in example if k == LABEL_KEY or k in IMAGE_KEYS]
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  out = dict(example)
  if preprocess.crop != "none":
    size = tuple(preprocess.image_size)
    top, left, ch, cw = _window(tf.shape(example[spatial[0]]), size, preprocess.crop,
                                preprocess.crop_scale, crop_seed)
    for k in spatial:
      out[k] = _resize(out[k][top:top + ch, left:left + cw], size, nearest=k == LABEL_KEY)
  if flip:
    do_flip = tf.random.stateless_uniform([], flip_seed) < 0.5
    for k in spatial:
      out[k] = tf.cond(do_flip, lambda v=out[k]: tf.reverse(v, axis=[1]), lambda v=out[k]: v)
  return out


class TrainIterator:
  """Endless per-process numpy batches {'image', 'label'} with a checkpointable position.

  `batch_size` is this process's share; the global batch is batch_size x process count.
  `preprocess` crops and resizes (default: stored size); `keys` picks the features returned.
  """

  def __init__(self, builder, batch_size: int, seed: int, position: int = 0, flip: bool = True,
               *, preprocess: Optional[Preprocess] = None, keys=("image", "label")):
    self.batch_size, self.seed, self.position = batch_size, seed, position
    self.global_batch_size = batch_size * jax.process_count()
    self._dataset = _train_dataset(builder, batch_size, seed, position, flip,
                                   preprocess or Preprocess(), tuple(keys))
    self._batches = None  # started on the first next(): nothing is read before it is needed

  @property
  def element_spec(self) -> dict:
    """{key: (per-process batch shape, numpy dtype)}, known before any data is read."""
    return {k: (tuple(v.shape), v.dtype.as_numpy_dtype)
            for k, v in self._dataset.element_spec.items()}

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._batches is None:
      self._batches = self._dataset.as_numpy_iterator()
    batch = next(self._batches)
    self.position += 1
    return batch

  def close(self) -> None:
    """Stop reading ahead now (the pipeline's threads end with its iterator, which otherwise
    waits for them whenever it is collected); a later next() starts reading again."""
    self._batches = None

  def state(self) -> dict:
    """JSON-able; `position` counts the (global) batches this iterator has returned."""
    return {"position": self.position, "global_batch_size": self.global_batch_size,
            "seed": self.seed}

  @classmethod
  def from_state(cls, builder, state: dict, batch_size: int, seed: int, flip: bool = True,
                 **kwargs):
    """The iterator continuing at the next unseen batch of a checkpointed `state`."""
    global_batch = batch_size * jax.process_count()
    saved = (state.get("global_batch_size"), state.get("seed"))
    if saved != (global_batch, seed):
      raise ValueError(
          f"the checkpointed data stream has global batch {saved[0]} and seed {saved[1]}, this "
          f"config has {global_batch} and {seed}; resuming would repeat or skip data (start a "
          "new workdir to change them)")
    return cls(builder, batch_size, seed, state["position"], flip, **kwargs)


def train_iterator(builder, batch_size: int, seed: int, start_step: int = 0,
                   flip: bool = True, **kwargs) -> TrainIterator:
  """Batches from batch `start_step` on (a fresh run: 0)."""
  return TrainIterator(builder, batch_size, seed, start_step, flip, **kwargs)


def process_split(split: str) -> str:
  """This process's part of `split`: disjoint across processes, together all of it (evaluation
  and statistics; the training stream instead splits every global batch, see the docstring)."""
  return tfds.split_for_jax_process(split, process_index=jax.process_index(),
                                    process_count=jax.process_count(), drop_remainder=False)


def _train_dataset(builder, batch_size: int, seed: int, position: int, flip: bool,
                   preprocess: Preprocess, keys):
  process, processes = jax.process_index(), jax.process_count()
  global_batch = batch_size * processes
  base = _load(builder, "train", keys, decode=False).cache()
  num_examples = int(base.cardinality())
  if num_examples < global_batch:
    raise ValueError(f"train split has {num_examples} examples, fewer than the global batch "
                     f"{global_batch}")
  epoch, offset = divmod(position * global_batch, num_examples)

  def one_epoch(e):
    shuffled = base.shuffle(num_examples, seed=seed * 1_000_003 + e,
                            reshuffle_each_iteration=False)
    return shuffled.enumerate().map(lambda i, ex: (e, i, ex))

  ds = tf.data.Dataset.range(epoch, np.iinfo(np.int64).max).flat_map(one_epoch).skip(offset)
  if processes > 1:
    # Global batches start at a multiple of global_batch (offset is one), so example j of the
    # stream is row j % global_batch; this process owns rows [process, process + 1) x batch.
    ds = ds.enumerate().filter(
        lambda j, item: (j // batch_size) % processes == process).map(lambda j, item: item)

  decode = _decoder(builder, keys)

  def prepare(e, i, ex):
    # Crop and flip seeds depend on the example's place in the global stream only, so every
    # process count produces the same global batches.
    example_seed = tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + e, i])
    return _transform(decode(ex), example_seed, preprocess, flip)

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)  # ordered: deterministic
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


NATIVE_LABEL_KEY = "label_native"  # evaluation: the label at its stored size, padded with 255
NATIVE_SIZE_KEY = "label_size"     # evaluation: that label's (height, width)


def _eval_dataset(builder, split: str, keys, preprocess: Optional[Preprocess],
                  native_labels: bool = False):
  preprocess = (preprocess or Preprocess()).for_eval()
  decode = _decoder(builder, keys)
  no_seed = tf.constant([0, 0], tf.int64)  # evaluation never crops or flips at random

  def prepare(example):
    example = decode(example)
    out = _transform(example, no_seed, preprocess, flip=False)
    if native_labels:
      out[NATIVE_LABEL_KEY] = example[LABEL_KEY]
      out[NATIVE_SIZE_KEY] = tf.shape(example[LABEL_KEY], out_type=tf.int32)[:2]
    return out
  return _load(builder, split, keys, decode=False).map(prepare,
                                                       num_parallel_calls=tf.data.AUTOTUNE)


def _padded_batches(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """Batches; native labels of different sizes are padded to the batch's largest with 255."""
  def padding(key, spec):
    if spec.dtype == tf.string:
      return tf.constant("", tf.string)
    return tf.constant(255 if key == NATIVE_LABEL_KEY else 0, spec.dtype)
  values = {k: padding(k, v) for k, v in ds.element_spec.items()}
  return ds.padded_batch(batch_size, padding_values=values)


def eval_batches(builder, split: str, batch_size: int, num_examples: int = -1,
                 keys=("image", "label"), preprocess: Optional[Preprocess] = None,
                 native_labels: bool = False) -> Iterator[dict]:
  """Per-process numpy batches of `split` with a 0/1 'mask' and each example's 'index' in the
  split (what its randomness is keyed by); padding examples have mask 0 (and index -1).

  Every process yields the same number of batches, so collective steps stay in lock-step. Any
  crop in `preprocess` becomes 'full': the whole image at the model's size. With
  `native_labels`, each batch also holds 'label_native', every label at its stored size padded
  with 255 to the largest in the batch (host memory: batch x that size bytes, e.g. 64 Cityscapes
  labels = 128 MiB), and 'label_size' (B, 2), each one's (height, width).
  """
  total = builder.info.splits[split].num_examples
  if num_examples > 0:
    total = min(total, num_examples)
  per_process = math.ceil(total / jax.process_count())
  start = jax.process_index() * per_process
  stop = min(total, start + per_process)
  num_batches = math.ceil(per_process / batch_size)
  ds = _eval_dataset(builder, f"{split}[{start}:{stop}]", keys, preprocess, native_labels) \
      if stop > start else None
  # Two batches ahead: enough to overlap decoding with the model, bounded for native labels.
  batches = _padded_batches(ds, batch_size).prefetch(2).as_numpy_iterator() \
      if ds is not None else iter(())
  template = None
  for b in range(num_batches):
    batch = next(batches, None)
    if batch is None:  # this process ran out: a fully masked batch shaped like the template
      if template is None:
        template = _empty_batch(builder, keys, preprocess, native_labels)
      batch = {k: np.zeros_like(v[:0]) for k, v in template.items()}
    template = template or batch
    real = len(batch[keys[0]])
    pad = batch_size - real
    batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) if pad else v
             for k, v in batch.items()}
    batch["mask"] = (np.arange(batch_size) < real).astype(np.float32)
    first = start + b * batch_size
    batch["index"] = np.where(batch["mask"] > 0, first + np.arange(batch_size), -1).astype(
        np.int32)
    yield batch


def _empty_batch(builder, keys, preprocess, native_labels=False):
  """A zero-length batch with the shapes evaluation batches have (for a process with none)."""
  one = _eval_dataset(builder, f"{next(iter(builder.info.splits))}[:1]", keys, preprocess,
                      native_labels)
  return {k: v[:0] for k, v in next(one.batch(1).as_numpy_iterator()).items()}


def load_arrays(builder, split: str, num_examples: int, keys=("image", "label"),
                preprocess: Optional[Preprocess] = None) -> dict:
  """The first `num_examples` (at most the whole split) of a split as numpy arrays."""
  num_examples = min(num_examples, builder.info.splits[split].num_examples)
  ds = _eval_dataset(builder, f"{split}[:{num_examples}]", keys, preprocess)
  return next(ds.batch(num_examples).as_numpy_iterator())
