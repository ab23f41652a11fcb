"""Input pipelines by random access: global example order, per-process rows, crop, resize, flip.

Datasets are stored as ArrayRecord (`records.py`) and read by index. The training stream is a
pure function of (seed, position):

- Example order: epoch e of a split of N examples is the permutation
  `r -> tf.random.experimental.index_shuffle(r, [seed, e], N - 1)` (`epoch_order`); the epochs
  are laid end to end and cut into global batches of B x P examples (B per process, P
  processes), so batches run across epoch boundaries.
- Rows: process p owns rows [p B, (p + 1) B) of every global batch and reads exactly those
  records (nothing else: each process reads 1/P of each epoch), so the global batches are the
  same for any number of processes.
- Randomness: the crop window and the flip of example k in epoch e draw from the stateless seed
  (seed * 1_000_003 + e, k) (`augmentation`), whoever reads it.

So the iterator's whole state is the number of global batches it has handed out:
`TrainIterator.state()` is that number (with the global batch size and seed it refers to); it
goes into every checkpoint, and a resumed run computes the indices of the next unseen batch and
reads from there (nothing is read to skip). Nothing holds the split in memory; a process's first
batch costs B reads, whatever the split's size.

The work is split in two. A Python reader thread (`_Feed`) computes the indices
(`_train_index_batches`), reads those records in batches (`records.Records.__getitems__`) and
enqueues them, in order, on a TF queue; a tf.data graph (`_train_dataset`) dequeues them and, on
tf.data's thread pool (C++ threads, no extra processes, no Python inside them, so closing at exit
cannot deadlock), parses, decodes, crops, resizes and flips each example (`_parser`,
`_transform`), then batches with a fixed prefetch (PREFETCH_BATCHES), so what a process reads
ahead is bounded. Images are resized bicubic with antialiasing, labels nearest
(`semflow_jax.resize.image` / `resize.labels` are the same operations in numpy, for callers
outside the pipeline).

A second per-example source is read beside the record at the same indices (`_Feed`'s `extra`)
and prepared with the same `Augmentation`: cached image latents (`data/latents.py`,
config.data.image_latents) hold each image's VAE moments as stored and mirrored, encoded through
the window the labels are then cropped with, and the example's flip picks one.

Evaluation reads a disjoint, contiguous part of the split per process and pads the last batch
with masked examples so every example counts once on any number of processes; it never crops
(the whole image is resized to the model's input, as the literature evaluates) and can deliver
each label at its native size besides, for scoring at the label's own resolution.

`Preprocess` (from config.data) says how stored examples become model-sized; the default
(`crop='none'`) passes them through unchanged, which the synthetic dataset relies on.
"""

import contextlib
import dataclasses
import itertools
import math
import threading
import weakref
from typing import Iterator, NamedTuple, Optional, Tuple

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from semflow_jax.data import records, synthetic

CROPS = ("none", "random", "center", "full")
LABEL_KEY = "label"
IMAGE_KEYS = ("image", "image_alt")  # resized bicubic; the label nearest; anything else as is
_SHUFFLE_SEED_STRIDE = 1_000_003     # epoch e of seed s draws augmentations from s * this + e


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
  """The prepared tfds builder named by config.data, stored for random access.

  The synthetic dataset is generated on first use, by one process when several start at once
  (the others wait). A manual-download dataset that is not built yet is built from
  `config.data.manual_dir` when that is set, a folder dataset from `config.data.folder`
  (single-process runs only). A dataset built in the old TFRecord format is an error naming
  the command that rewrites it.
  """
  data_dir = data.tfds_data_dir or None
  if data.name == "folder_dataset":  # your own folder: config.data.folder (data/folder.py)
    from semflow_jax.data import folder
    return folder.get_builder(data)
  if data.name == "synthetic_scenes":
    defaults = (data.num_train, data.num_validation, data.seed) == (5000, 500, 0)
    name = f"{data.image_size}" if defaults else \
        f"{data.image_size}_n{data.num_train}_{data.num_validation}_s{data.seed}"
    predefined = {c.name for c in synthetic.SyntheticScenes.BUILDER_CONFIGS}
    builder_config = name if name in predefined else synthetic.SyntheticScenesConfig(
        name=name, image_size=data.image_size, num_train=data.num_train,
        num_validation=data.num_validation, seed=data.seed)
    builder = synthetic.SyntheticScenes(config=builder_config, data_dir=data_dir)
    if not builder.is_prepared():
      old = records.stored_versions(builder)
      if old:
        logging.info("synthetic_scenes %s: version %s is in the old TFRecord format; "
                     "generating version %s beside it", name, ", ".join(old), builder.version)
      builder = records.prepare(builder, builds=jax.process_index() == 0)
    return builder
  import semflow_jax.data  # noqa: F401  (registers the manual-download builders)
  builder = tfds.builder(data.name, data_dir=data_dir)
  command = (f"python -m semflow_jax.data.build {data.name} --manual_dir=<dir> "
             f"--data_dir={builder.data_dir_root}")
  if not builder.is_prepared():
    manual_dir = data.get("manual_dir")
    old = records.stored_versions(builder)
    if old and not manual_dir:
      raise FileNotFoundError(
          f"dataset {data.name} in {builder.data_dir_root} is stored in the old TFRecord format "
          f"(version {', '.join(old)}); rewrite it for random access: `{command}` (<dir>: the "
          "unpacked download)")
    if not manual_dir:
      raise FileNotFoundError(
          f"dataset {data.name} is not built in {builder.data_dir_root}; build it with "
          f"`{command}` or set config.data.manual_dir to the unpacked download")
    if jax.process_count() > 1:
      raise FileNotFoundError(
          f"dataset {data.name} is not built in {builder.data_dir_root}; build it once before "
          f"a multi-process run: `{command}`")
    builder = records.prepare(builder, manual_dir)
  if not records.is_array_record(builder):
    raise FileNotFoundError(
        f"dataset {data.name} in {builder.data_path} is stored as {builder.info.file_format.value}"
        f", not ArrayRecord; rewrite it for random access: `{command}` (<dir>: the unpacked "
        "download)")
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


def open_split(builder, split: str) -> records.Records:
  """The split's serialized examples by index: `len(source)`, `source.__getitems__(indices)`.

  Reads only the records asked for (ArrayRecord files; gs:// paths through ArrayRecord's own
  GCS client).
  """
  if not records.is_array_record(builder):
    raise FileNotFoundError(
        f"dataset {builder.name} in {builder.data_path} is stored as "
        f"{builder.info.file_format.value}, not ArrayRecord; rebuild it with "
        f"`python -m semflow_jax.data.build {builder.name} ...` (see its module docstring)")
  return records.Records(builder, split)


def epoch_order(seed: int, epoch: int, num_examples: int) -> np.ndarray:
  """Example indices of epoch `epoch` of the training stream, in the order they are used."""
  return _shuffled(tf.range(num_examples, dtype=tf.int64), seed, epoch, num_examples).numpy()


def _shuffled(r, seed, epoch, num_examples):
  """Positions r (int64 [n]) of epochs `epoch` ([n] or scalar) -> example indices.

  `tf.random.experimental.index_shuffle(r, [seed, epoch], num_examples - 1)` per element: the
  raw op, because the wrapper pads a matrix of seeds along the wrong axis (TF 2.21); the first
  seed word is the wrapper's own constant.
  """
  shape = tf.shape(r)
  seeds = tf.stack([tf.fill(shape, tf.constant(498247692, tf.int64)),
                    tf.fill(shape, tf.cast(seed, tf.int64)),
                    tf.broadcast_to(tf.cast(epoch, tf.int64), shape)], axis=-1)
  return tf.raw_ops.RandomIndexShuffle(index=r, seed=seeds,
                                       max_index=tf.cast(num_examples - 1, tf.int64), rounds=4)


def _window(shape, out_size, crop: str, crop_scale, seed):
  """(top, left, height, width) of the crop window in an image of `shape`."""
  height, width = shape[0], shape[1]
  if crop in ("full", "none"):
    return tf.constant(0), tf.constant(0), height, width
  aspect = out_size[1] / out_size[0]
  h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  side = tf.minimum(h, w / aspect)  # height of the largest window with the output's aspect
  scale_seed, top_seed, left_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))  # pyright: ignore[reportAttributeAccessIssue]
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
    # uint8 straight in: the kernel computes in float32 all the same (identical results) and
    # the cast of a whole frame is saved.
    y = tf.image.resize(x, size, method="bicubic", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(y), 0, 255), x.dtype)
  same = tf.reduce_all(tf.equal(tf.shape(x)[:2], size))
  return tf.ensure_shape(tf.cond(same, lambda: x, resize), (*size, x.shape[-1]))


class Augmentation(NamedTuple):
  """Where an example's arrays come from in the stored frame, and whether they are mirrored."""
  top: tf.Tensor     # crop window in stored pixels (the whole frame for crop 'none' / 'full')
  left: tf.Tensor
  height: tf.Tensor
  width: tf.Tensor
  flip: tf.Tensor    # bool: mirror left-right after resizing


def augmentation(seed, stored_shape, preprocess: "Preprocess", flip: bool) -> Augmentation:
  """The crop window and flip of one example, a pure function of its stateless `seed`."""
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))  # pyright: ignore[reportAttributeAccessIssue]
  size = tuple(preprocess.image_size) if preprocess.image_size else None
  window = _window(stored_shape, size, preprocess.crop, preprocess.crop_scale, crop_seed)
  do_flip = (tf.random.stateless_uniform([], flip_seed) < 0.5) if flip else tf.constant(False)
  return Augmentation(*window, do_flip)


def augment(x, aug: Augmentation, preprocess: "Preprocess", nearest: bool):
  """One spatial array (H, W, C) of the example: crop, resize to the model's size, flip."""
  if preprocess.crop != "none":
    x = x[aug.top:aug.top + aug.height, aug.left:aug.left + aug.width]
    x = _resize(x, tuple(preprocess.image_size), nearest=nearest)
  return tf.cond(aug.flip, lambda: tf.reverse(x, axis=[1]), lambda: x)


def _transform(example, seed, preprocess: "Preprocess", flip: bool):
  """The same crop, resize and flip for every image and the label of one example."""
  spatial = [k for k in example if k == LABEL_KEY or k in IMAGE_KEYS]
  out = dict(example)
  if not spatial:
    return out
  aug = augmentation(seed, tf.shape(example[spatial[0]]), preprocess, flip)
  for k in spatial:
    out[k] = augment(example[k], aug, preprocess, nearest=k == LABEL_KEY)
  return out


def _parser(builder, keys):
  """serialized tf.train.Example -> {key: tensor} for `keys` (other images stay undecoded)."""
  features = builder.info.features
  skip = {k: tfds.decode.SkipDecoding() for k, f in features.items()
          if k not in keys and isinstance(f, tfds.features.Image)}

  def parse(serialized):
    example = features.deserialize_example(serialized, decoders=skip)
    return {k: example[k] for k in keys}
  return parse


class _Feed:
  """Records for a tf.data graph, read on a Python thread and handed over through a TF queue.

  No Python runs inside tf.data's threads: a tf.data iterator destroyed while a Python callback
  of its (`tf.numpy_function`) waits for the interpreter lock deadlocks, e.g. at interpreter
  exit. Here the graph only dequeues (a TF op), the thread reads and enqueues in order, and
  `close` (called before the graph's iterator goes, and at exit) ends both sides.

  `index_batches` yields (epochs, example indices) arrays; each becomes one read of the source.
  `extra` sources (cached image latents) are read at the same indices, their records handed
  over beside the source's.
  """

  def __init__(self, source, index_batches: Iterator, capacity: int, extra=()):
    sources = (source, *extra)
    self.queue = tf.queue.FIFOQueue(capacity, [tf.int64, tf.int64] + [tf.string] * len(sources),
                                    shapes=[[]] * (2 + len(sources)))
    self._args = (self.queue, sources, index_batches)
    self._errors = []  # what stopped the thread, raised again to the consumer
    self._thread = None
    self._closer = weakref.finalize(self, _close_queue, self.queue)  # also runs at exit

  def dequeue(self, _=None):
    """(epoch, example index, serialized example[, extra records]): the next record, in the
    feed's order."""
    return self.queue.dequeue()

  def start(self) -> None:
    if self._thread is None:
      self._thread = threading.Thread(target=_feed, args=(*self._args, self._errors),
                                      name="semflow_jax records", daemon=True)
      self._thread.start()

  def check(self) -> None:
    """Raise what stopped the thread, if anything did."""
    if self._errors:
      raise self._errors[0]

  def close(self) -> None:
    self._closer()
    if self._thread is not None:
      self._thread.join(timeout=10)


def _feed(queue, sources, index_batches, errors) -> None:
  try:
    for epochs, indices in index_batches:
      records = [np.array(source.__getitems__(indices.tolist()), dtype=object)
                 for source in sources]
      queue.enqueue_many([epochs, indices, *records])
  except tf.errors.CancelledError:  # closed: the consumer is gone
    pass
  except Exception as e:  # noqa: BLE001  (handed to the consumer)
    errors.append(e)
    _close_queue(queue)


def _close_queue(queue) -> None:
  try:
    queue.close(cancel_pending_enqueues=True)
  except Exception:  # noqa: BLE001  (interpreter shutting down: nothing left to unblock)
    pass


def _train_index_batches(seed: int, num_examples: int, batch_size: int, process_count: int,
                         process_index: int, first_batch: int) -> Iterator:
  """(epochs, example indices) of this process's rows of global batches first_batch, ...

  Row r of process p in global batch b is position b G + p B + r of the stream (G = B P), which
  is example `epoch_order(seed, e)[i]` for e, i = divmod(position, num_examples).
  """
  global_batch = batch_size * process_count
  orders = {}
  for b in itertools.count(first_batch):
    positions = b * global_batch + process_index * batch_size + np.arange(batch_size)
    epochs, offsets = np.divmod(positions, num_examples)
    for e in np.unique(epochs):
      if e not in orders:
        orders = {k: v for k, v in orders.items() if k > e - 2}  # at most two epochs held
        orders[e] = epoch_order(seed, int(e), num_examples)
    indices = np.array([orders[e][i] for e, i in zip(epochs, offsets)], np.int64)
    yield epochs.astype(np.int64), indices


def _train_dataset(builder, feed: _Feed, batch_size: int, seed: int, flip: bool,
                   preprocess: Preprocess, keys, latents=None):
  parse = _parser(builder, keys)

  def prepare(epoch, index, record, *latent_record):
    # Seeds depend on the example and its epoch only: any process count, the same batches.
    example_seed = tf.stack([tf.cast(seed, tf.int64) * _SHUFFLE_SEED_STRIDE + epoch, index])
    example = parse(record)
    if latents is None:
      return _transform(example, example_seed, preprocess, flip)
    # The label's window and flip are drawn as for the image of an image run; the moments are
    # the image's, encoded through the same window, mirrored or not (data/latents.py).
    label = example[LABEL_KEY]
    aug = augmentation(example_seed, tf.shape(label), preprocess, flip)
    out = {k: v for k, v in example.items() if k != LABEL_KEY}
    out[LABEL_KEY] = augment(label, aug, preprocess, nearest=True)
    out[latents.KEY] = latents.moments(latent_record[0], aug.flip)
    return out

  ds = tf.data.Dataset.range(np.iinfo(np.int64).max).map(feed.dequeue)  # in order
  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)  # ordered: deterministic
  # A fixed read-ahead, not AUTOTUNE's: on a loaded host autotuning grew it to tens of batches,
  # host memory and reads that a pod's hosts cannot plan for.
  return ds.batch(batch_size, drop_remainder=True).prefetch(PREFETCH_BATCHES)


class TrainIterator:
  """Endless per-process numpy batches {'image', 'label'} with a checkpointable position.

  `batch_size` is this process's share; the global batch is batch_size x process count.
  `preprocess` crops and resizes (default: stored size); `keys` picks the features returned.
  `source` (default `open_split(builder, 'train')`) is where records are read by index.
  `latents` (data/latents.py `Latents`, config.data.image_latents): 'image_moments' of the
  images, read at the same indices, replace the images (the labels are cropped as they were
  encoded: `Latents.preprocess`). Reading starts at the first `next()`; `close()` stops it
  (also done when the iterator is garbage collected and at interpreter exit).
  """

  def __init__(self, builder, batch_size: int, seed: int, position: int = 0, flip: bool = True,
               *, preprocess: Optional[Preprocess] = None, keys=("image", "label"),
               source=None, latents=None):
    self.batch_size, self.seed, self.position = batch_size, seed, position
    processes = jax.process_count()
    self.global_batch_size = batch_size * processes
    source = source or open_split(builder, "train")
    if len(source) < self.global_batch_size:
      raise ValueError(f"train split has {len(source)} examples, fewer than the global batch "
                       f"{self.global_batch_size}")
    preprocess = preprocess or Preprocess()
    extra = ()
    if latents is not None:
      if len(latents.source) != len(source):
        raise ValueError(f"{latents.path}: {len(latents.source)} examples, the train split "
                         f"{len(source)}")
      keys = tuple(k for k in keys if k not in IMAGE_KEYS)
      preprocess, extra = latents.preprocess(preprocess), (latents.source,)
    self._feed = _Feed(source, _train_index_batches(
        seed, len(source), batch_size, processes, jax.process_index(), position),
        capacity=2 * batch_size, extra=extra)
    self._dataset = _train_dataset(builder, self._feed, batch_size, seed, flip,
                                   preprocess, tuple(keys), latents)
    self._batches = None  # started on the first next(): nothing is read before it is needed

  @property
  def element_spec(self) -> dict:
    """{key: (per-process batch shape, numpy dtype)}, known before any data is read."""
    return {k: (tuple(v.shape), v.dtype.as_numpy_dtype)  # pyright: ignore[reportAttributeAccessIssue]
            for k, v in self._dataset.element_spec.items()}  # pyright: ignore[reportAttributeAccessIssue]

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._batches is None:
      self._feed.start()
      self._batches = self._dataset.as_numpy_iterator()
    try:
      batch = next(self._batches)
    except tf.errors.OpError:
      self._feed.check()  # the reader's own error, if it stopped the stream
      raise
    self.position += 1
    return batch

  def close(self) -> None:
    """Stop reading ahead now (the queue first, so that nothing waits on it), then drop the
    graph; a later next() starts reading again."""
    self._feed.close()
    self._batches = None

  def __del__(self):
    feed = getattr(self, "_feed", None)
    if feed is not None:
      feed.close()

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


NATIVE_LABEL_KEY = "label_native"  # evaluation: the label at its stored size, padded with 255
NATIVE_SIZE_KEY = "label_size"     # evaluation: that label's (height, width)
_EVAL_READ = 16                    # records per read in evaluation
# Training batches prepared ahead of the one the step takes; with the feed's queue (2 batches)
# and the records in the parallel map (at most one per core) this bounds what a process reads
# beyond what it has consumed.
PREFETCH_BATCHES = 4


def _eval_feed(source, start: int, stop: int) -> _Feed:
  def index_batches():
    for first in range(start, stop, _EVAL_READ):
      indices = np.arange(first, min(stop, first + _EVAL_READ), dtype=np.int64)
      yield np.zeros_like(indices), indices
  return _Feed(source, index_batches(), capacity=2 * _EVAL_READ)


def _eval_dataset(builder, feed: _Feed, count: int, keys, preprocess: Optional[Preprocess],
                  native_labels: bool = False):
  """The `count` examples `feed` delivers, in order, whole frames."""
  preprocess = (preprocess or Preprocess()).for_eval()
  parse = _parser(builder, keys)
  no_seed = tf.constant([0, 0], tf.int64)  # evaluation never crops or flips at random

  def prepare(epoch, index, record):
    del epoch, index
    example = parse(record)
    out = _transform(example, no_seed, preprocess, flip=False)
    if native_labels:
      out[NATIVE_LABEL_KEY] = example[LABEL_KEY]
      out[NATIVE_SIZE_KEY] = tf.shape(example[LABEL_KEY], out_type=tf.int32)[:2]
    return out
  ds = tf.data.Dataset.range(count).map(feed.dequeue)
  return ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)


@contextlib.contextmanager
def _examples(builder, source, start: int, stop: int, keys, preprocess, native_labels=False,
              batch_size: Optional[int] = None, prefetch: int = 0):
  """Numpy batches (padded, see `_padded_batches`) of examples [start, stop) of a split."""
  feed = _eval_feed(source, start, stop)
  ds = _padded_batches(_eval_dataset(builder, feed, stop - start, keys, preprocess,
                                     native_labels), batch_size or max(1, stop - start))
  feed.start()
  try:
    yield ds.prefetch(prefetch).as_numpy_iterator() if prefetch else ds.as_numpy_iterator()
  finally:
    feed.close()


def _padded_batches(ds: tf.data.Dataset, batch_size: int) -> tf.data.Dataset:
  """Batches; native labels of different sizes are padded to the batch's largest with 255."""
  def padding(key, spec):
    if spec.dtype == tf.string:
      return tf.constant("", tf.string)
    return tf.constant(255 if key == NATIVE_LABEL_KEY else 0, spec.dtype)
  values = {k: padding(k, v) for k, v in ds.element_spec.items()}  # pyright: ignore[reportAttributeAccessIssue]
  return ds.padded_batch(batch_size, padding_values=values)


def eval_batches(builder, split: str, batch_size: int, num_examples: int = -1,
                 keys=("image", "label"), preprocess: Optional[Preprocess] = None,
                 native_labels: bool = False) -> Iterator[dict]:
  """Per-process numpy batches of `split` with a 0/1 'mask' and each example's 'index' in the
  split (what its randomness is keyed by); padding examples have mask 0 (and index -1).

  Process p reads examples [p n, (p + 1) n) of the split (n = ceil(total / processes)). Every
  process yields the same number of batches, so collective steps stay in lock-step. Any crop in
  `preprocess` becomes 'full': the whole image at the model's size. With `native_labels`, each
  batch also holds 'label_native', every label at its stored size padded with 255 to the largest
  in the batch (host memory: batch x that size bytes, e.g. 64 Cityscapes labels = 128 MiB), and
  'label_size' (B, 2), each one's (height, width).
  """
  source = open_split(builder, split)
  total = len(source)
  if num_examples > 0:
    total = min(total, num_examples)
  per_process = math.ceil(total / jax.process_count())
  start = jax.process_index() * per_process
  stop = min(total, start + per_process)
  num_batches = math.ceil(per_process / batch_size)
  with contextlib.ExitStack() as stack:
    # Two batches ahead: enough to overlap decoding with the model, bounded for native labels.
    batches = stack.enter_context(_examples(builder, source, start, stop, keys, preprocess,
                                            native_labels, batch_size, prefetch=2)) \
        if stop > start else iter(())
    template = None
    for b in range(num_batches):
      batch = next(batches, None)
      if batch is None:  # this process ran out: a fully masked batch shaped like the template
        if template is None:
          template = _empty_batch(builder, source, keys, preprocess, native_labels)
        batch = {k: np.zeros_like(v[:0]) for k, v in template.items()}  # pyright: ignore[reportAttributeAccessIssue]
      template = template or batch
      real = len(batch[keys[0]])
      pad = batch_size - real
      batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) if pad else v
               for k, v in batch.items()}  # pyright: ignore[reportAttributeAccessIssue]
      batch["mask"] = (np.arange(batch_size) < real).astype(np.float32)
      first = start + b * batch_size
      batch["index"] = np.where(batch["mask"] > 0, first + np.arange(batch_size), -1).astype(
          np.int32)
      yield batch


def _empty_batch(builder, source, keys, preprocess, native_labels=False):
  """A zero-length batch with the shapes evaluation batches have (for a process with none)."""
  with _examples(builder, source, 0, 1, keys, preprocess, native_labels) as one:
    return {k: v[:0] for k, v in next(one).items()}  # pyright: ignore[reportAttributeAccessIssue]


def load_arrays(builder, split: str, num_examples: int, keys=("image", "label"),
                preprocess: Optional[Preprocess] = None) -> dict:
  """The first `num_examples` (at most the whole split) of a split as numpy arrays."""
  source = open_split(builder, split)
  num_examples = min(num_examples, len(source))
  with _examples(builder, source, 0, num_examples, keys, preprocess) as batches:
    return next(batches)
