"""tf.data input pipelines: per-process split, epoch-seeded shuffle, flips, batching.

The training stream is a pure function of (seed, position): epoch e is shuffled with a seed
derived from (seed, e) and every flip draws from a stateless seed of (seed, e, index), so the
iterator's whole state is the number of batches it has handed out. `TrainIterator.state()` is
that number (with the batch size and seed it refers to); it goes into every checkpoint, and a
resumed run rebuilds the stream at the next unseen batch. The stream of global batches does not
depend on the number of processes: every process walks the same shuffled order of (still
encoded) examples and decodes only its own rows of each global batch, so a run on 2 hosts sees
exactly the batches a run on 1 host sees. Evaluation pads the last batch with masked examples
so every example counts once.
"""

import math
from typing import Iterator

import jax
import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from semflow_jax.data import synthetic


def get_builder(data: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The tfds builder named by config.data; the synthetic dataset is generated on first use."""
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
  return tfds.builder(data.name, data_dir=data_dir)


def _load(builder, split: str, keys, decode: bool = True) -> tf.data.Dataset:
  """`keys` of `split`; with decode=False, image features stay encoded (see `_decode`)."""
  decoders = None if decode else {k: tfds.decode.SkipDecoding() for k in keys
                                  if isinstance(builder.info.features[k], tfds.features.Image)}
  ds = builder.as_dataset(split=split, shuffle_files=False, decoders=decoders,
                          read_config=tfds.ReadConfig(add_tfds_id=False))
  return ds.map(lambda ex: {k: ex[k] for k in keys}, num_parallel_calls=tf.data.AUTOTUNE)


def _decode(builder, example):
  """Decode what `_load(..., decode=False)` left encoded."""
  features = builder.info.features
  return {k: features[k].decode_example(v) if isinstance(features[k], tfds.features.Image) else v
          for k, v in example.items()}


def _flip(example, seed):
  """The same random left-right flip for image and label."""
  flip = tf.random.stateless_uniform([], seed) < 0.5
  return {k: tf.cond(flip, lambda v=v: tf.reverse(v, axis=[1]), lambda v=v: v)
          for k, v in example.items()}


class TrainIterator:
  """Endless per-process numpy batches {'image', 'label'} with a checkpointable position.

  `batch_size` is this process's share; the global batch is batch_size x process count.
  """

  def __init__(self, builder, batch_size: int, seed: int, position: int = 0, flip: bool = True):
    self.batch_size, self.seed, self.position = batch_size, seed, position
    self.global_batch_size = batch_size * jax.process_count()
    self._dataset = _train_dataset(builder, batch_size, seed, position, flip)
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

  def state(self) -> dict:
    """JSON-able; `position` counts the (global) batches this iterator has returned."""
    return {"position": self.position, "global_batch_size": self.global_batch_size,
            "seed": self.seed}

  @classmethod
  def from_state(cls, builder, state: dict, batch_size: int, seed: int, flip: bool = True):
    """The iterator continuing at the next unseen batch of a checkpointed `state`."""
    global_batch = batch_size * jax.process_count()
    saved = (state.get("global_batch_size"), state.get("seed"))
    if saved != (global_batch, seed):
      raise ValueError(
          f"the checkpointed data stream has global batch {saved[0]} and seed {saved[1]}, this "
          f"config has {global_batch} and {seed}; resuming would repeat or skip data (start a "
          "new workdir to change them)")
    return cls(builder, batch_size, seed, state["position"], flip)


def train_iterator(builder, batch_size: int, seed: int, start_step: int = 0,
                   flip: bool = True) -> TrainIterator:
  """Batches from batch `start_step` on (a fresh run: 0)."""
  return TrainIterator(builder, batch_size, seed, start_step, flip)


def _train_dataset(builder, batch_size: int, seed: int, position: int, flip: bool):
  process, processes = jax.process_index(), jax.process_count()
  global_batch = batch_size * processes
  base = _load(builder, "train", ("image", "label"), decode=False).cache()
  num_examples = int(base.cardinality())
  if num_examples < global_batch:
    raise ValueError(f"train split has {num_examples} examples, fewer than the global batch "
                     f"{global_batch}")
  epoch, offset = divmod(position * global_batch, num_examples)

  def one_epoch(e):
    shuffled = base.shuffle(num_examples, seed=seed * 1_000_003 + e,
                            reshuffle_each_iteration=False)
    return shuffled.enumerate().map(lambda i, ex: (tf.stack([tf.cast(seed, tf.int64) * 1_000_003
                                                             + e, i]), ex))

  ds = tf.data.Dataset.range(epoch, np.iinfo(np.int64).max).flat_map(one_epoch).skip(offset)
  if processes > 1:
    # Global batches start at a multiple of global_batch (offset is one), so example j of the
    # stream is row j % global_batch; this process owns rows [process, process + 1) x batch.
    ds = ds.enumerate().filter(
        lambda j, ex: (j // batch_size) % processes == process).map(lambda j, ex: ex)

  def prepare(flip_seed, ex):
    ex = _decode(builder, ex)
    return _flip(ex, flip_seed) if flip else ex

  ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE)
  return ds.batch(batch_size, drop_remainder=True).prefetch(tf.data.AUTOTUNE)


def eval_batches(builder, split: str, batch_size: int, num_examples: int = -1,
                 keys=("image", "label")) -> Iterator[dict]:
  """Per-process numpy batches of `split` with a 0/1 'mask'; padding examples have mask 0.

  Every process yields the same number of batches, so collective steps stay in lock-step.
  """
  total = builder.info.splits[split].num_examples
  if num_examples > 0:
    total = min(total, num_examples)
  per_process = math.ceil(total / jax.process_count())
  start = jax.process_index() * per_process
  stop = min(total, start + per_process)
  num_batches = math.ceil(per_process / batch_size)
  ds = _load(builder, f"{split}[{start}:{stop}]", keys) if stop > start else None
  batches = ds.batch(batch_size).as_numpy_iterator() if ds is not None else iter(())
  template = None
  for _ in range(num_batches):
    batch = next(batches, None)
    if batch is None:  # this process ran out: a fully masked batch shaped like the template
      batch = {k: np.zeros_like(v[:0]) for k, v in template.items()}
    template = template or batch
    real = len(batch["label"])
    pad = batch_size - real
    batch = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) if pad else v
             for k, v in batch.items()}
    batch["mask"] = (np.arange(batch_size) < real).astype(np.float32)
    yield batch


def load_arrays(builder, split: str, num_examples: int, keys=("image", "label")) -> dict:
  """The first `num_examples` of a split as numpy arrays (small data: statistics, fixtures)."""
  ds = _load(builder, f"{split}[:{num_examples}]", keys)
  return next(ds.batch(num_examples).as_numpy_iterator())
