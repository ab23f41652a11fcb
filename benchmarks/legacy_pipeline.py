"""The training input pipeline as it was before issue 18, frozen for side-by-side benchmarks.

Every process cached the whole (encoded) train split, shuffled it with a buffer the size of the
split, walked every example of the stream and kept its own rows of each global batch. It reads
TFRecord datasets (`tfds.builder(..., file_format="tfrecord")`). Per-example cropping, resizing
and flipping are its own code too (copied from semflow_jax/data/pipeline.py at main d76d8a8).
Not used by semflow_jax; only benchmarks/input_at_scale.py runs it.
"""

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from semflow_jax.data import pipeline
from semflow_jax.data.pipeline import IMAGE_KEYS, LABEL_KEY


def _window(shape, out_size, crop: str, crop_scale, seed):
  """(top, left, height, width) of the crop window in an image of `shape`."""
  height, width = shape[0], shape[1]
  if crop == "full":
    return 0, 0, height, width
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
    y = tf.image.resize(tf.cast(x, tf.float32), size, method="bicubic", antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(y), 0, 255), x.dtype)
  same = tf.reduce_all(tf.equal(tf.shape(x)[:2], size))
  return tf.ensure_shape(tf.cond(same, lambda: x, resize), (*size, x.shape[-1]))


def _transform(example, seed, preprocess: "pipeline.Preprocess", flip: bool):
  """The same crop, resize and flip for every image and the label of one example."""
  spatial = [k for k in example if k == LABEL_KEY or k in IMAGE_KEYS]
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))  # pyright: ignore[reportAttributeAccessIssue]
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


def _image_keys(builder, keys):
  return [k for k in keys if isinstance(builder.info.features[k], tfds.features.Image)]


def _load(builder, split, keys):
  decoders = {k: tfds.decode.SkipDecoding() for k in _image_keys(builder, keys)}
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(add_tfds_id=False))
  return ds.map(lambda ex: {k: ex[k] for k in keys}, num_parallel_calls=tf.data.AUTOTUNE)


def train_dataset(builder, batch_size: int, seed: int, position: int = 0, flip: bool = True,
                  preprocess=None, keys=("image", "label")):
  preprocess = preprocess or pipeline.Preprocess()
  process, processes = jax.process_index(), jax.process_count()
  global_batch = batch_size * processes
  base = _load(builder, "train", keys).cache()
  num_examples = int(base.cardinality())
  epoch, offset = divmod(position * global_batch, num_examples)

  def one_epoch(e):
    shuffled = base.shuffle(num_examples, seed=seed * 1_000_003 + e,
                            reshuffle_each_iteration=False)
    return shuffled.enumerate().map(lambda i, ex: (e, i, ex))

  ds = tf.data.Dataset.range(epoch, np.iinfo(np.int64).max).flat_map(one_epoch).skip(offset)
  if processes > 1:
    ds = ds.enumerate().filter(
        lambda j, item: (j // batch_size) % processes == process).map(lambda j, item: item)
  encoded = _image_keys(builder, keys)

  def prepare(e, i, ex):
    ex = {k: builder.info.features[k].decode_example(v) if k in encoded else v
          for k, v in ex.items()}
    example_seed = tf.stack([tf.cast(seed, tf.int64) * 1_000_003 + e, i])
    return _transform(ex, example_seed, preprocess, flip)

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def train_batches(builder, batch_size: int, seed: int, **kwargs):
  """Endless numpy batches (the old TrainIterator without its checkpoint state)."""
  return train_dataset(builder, batch_size, seed, **kwargs).as_numpy_iterator()
