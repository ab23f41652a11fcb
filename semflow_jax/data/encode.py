"""Encode a run's training images once: the VAE moments that config.data.image_latents reads.

  python -m semflow_jax.data.encode --config=configs/coco_stuff.py \
      --config.data.tfds_data_dir=gs://my-bucket/tfds --config.model.init_from=gs://my-bucket/sd15 \
      --processes=4

Takes the run's --config (and overrides) and writes the SD-VAE posterior moments of every
example of the train split, both flips where config.data.flip (data/latents.py says what is
stored and how COCO-Stuff's random crops are cached), beside the tfds dataset (--output: any
directory, local or gs://). It ends by printing the flag that trains from them:
`--config.data.image_latents=<directory>`.

Like the dataset build (data/build.py): shards of --examples_per_shard consecutive examples,
written by --processes local processes and optionally by several machines (the same command on
each with --num_workers=N --worker_index=i; each encodes on its own accelerators, no job is
formed); worker 0 waits for every shard and commits (latents.json, written last). A killed
encode leaves no latents a run would read: the same command again writes only the shards that
are missing. Latents of another VAE, image size or crop already at --output are refused in one
line.
"""

import dataclasses
from typing import Callable, Optional

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from semflow_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "The run's config file (and its "
                                          "--config.key=value overrides).", lock_config=True)
_OUTPUT = flags.DEFINE_string("output", None, "Directory of the latents, local or gs:// "
                              "(default: beside the tfds dataset).")
_SHARDS = cli.define_shard_flags("encoding", "encode", "latents")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 16, "Images per VAE call (x2 with flips); "
                                   "rounded up to a multiple of the local devices.")

flags.mark_flag_as_required("config")


class _Encoder:
  """The run's VAE on this process's devices, and its train split, preprocessed as a run does."""

  def __init__(self, config, batch_size: int):
    import jax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from semflow_jax import checkpoint
    from semflow_jax.data import latents, pipeline
    from semflow_jax.semflow import SemFlow

    self.config = config
    devices = jax.local_devices()
    mesh = jax.sharding.Mesh(np.array(devices), ("data",))
    self.model = SemFlow.from_config(config)
    if not self.model.has_vae:
      raise latents.LatentsError(f"config.model.autoencoder={config.model.autoencoder!r}: "
                                 "image latents are the SD VAE's (autoencoder='sd_vae')")
    init_from = config.model.get("init_from")
    if init_from:  # only the VAE is read
      abstract = jax.eval_shape(self.model.init_vae, jax.random.PRNGKey(0))
      vae = checkpoint.load_converted(init_from, {"vae": abstract})["vae"]
    else:  # a run from scratch draws its VAE as state.create does
      vae = jax.jit(self.model.init_vae)(jax.random.split(jax.random.PRNGKey(config.seed))[0])
    self.params = jax.device_put({"vae": vae}, NamedSharding(mesh, P()))
    self.fingerprint = latents.fingerprint(self.params["vae"])
    self.builder = pipeline.get_builder(config.data)
    self.description = latents.describe(config, self.builder, self.model, self.fingerprint)
    self.batch = -(-batch_size // len(devices)) * len(devices)
    self.source = pipeline.open_split(self.builder, "train")
    preprocess = pipeline.Preprocess.from_config(config.data)
    self.preprocess = dataclasses.replace(preprocess, crop=latents.encoded_crop(preprocess.crop))
    self._parse = pipeline._parser(self.builder, ("image",))
    self._sharding = NamedSharding(mesh, P("data"))
    model = self.model
    self._moments = jax.jit(lambda params, images: model.image_moments(params, images),
                            out_shardings=NamedSharding(mesh, P()))

  def images(self, indices):
    """uint8 (n, H, W, 3): examples `indices` of the train split as the pipeline prepares them,
    before any flip (crop: `latents.encoded_crop`)."""
    import tensorflow as tf
    from semflow_jax.data import pipeline
    no_seed = tf.constant([0, 0], tf.int64)  # the encoded crops are deterministic
    parse, preprocess = self._parse, self.preprocess

    def prepare(record):
      return pipeline._transform(parse(record), no_seed, preprocess, flip=False)["image"]
    records = self.source.__getitems__([int(i) for i in indices])
    ds = tf.data.Dataset.from_tensor_slices(records).map(
        prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return next(ds.batch(len(records)).as_numpy_iterator())

  def moments(self, indices) -> list:
    """[float32 (V, h, w, 2C)] of examples `indices`: the moments of each image (and of it
    mirrored, where the recipe flips)."""
    import jax
    images = self.images(indices)
    if self.description["flips"]:
      images = np.concatenate([images, images[:, :, ::-1]])
    n = len(images)
    out = []
    for first in range(0, n, self.batch):  # fixed-size calls: one compiled program
      chunk = images[first:first + self.batch]
      padded = np.concatenate([chunk, np.zeros((self.batch - len(chunk), *chunk.shape[1:]),
                                               chunk.dtype)])
      result = self._moments(self.params, jax.device_put(padded, self._sharding))
      out.append(np.asarray(jax.device_get(result))[:len(chunk)])
    moments = np.concatenate(out).astype(np.float32)
    if self.description["flips"]:
      half = len(indices)
      return [np.stack([moments[i], moments[half + i]]) for i in range(half)]
    return [m[None] for m in moments]

  def encode(self, output: str, shards) -> None:
    from semflow_jax.data import latents
    for shard in shards:
      indices = range(shard.start, shard.stop)
      moments = []
      for first in range(shard.start, shard.stop, self.batch):
        moments += self.moments(indices[first - shard.start:first - shard.start + self.batch])
      latents.write_shard(output, shard, moments)


def _encode_in_child(config, output: str, shards, batch_size: int) -> None:
  """One local process's shards (spawned: the encoder is built anew there)."""
  _Encoder(config, batch_size).encode(output, shards)


def encode_latents(config, output: Optional[str] = None, *, processes: int = 1,
                   num_workers: int = 1, worker_index: int = 0, examples_per_shard: int = 1000,
                   batch_size: int = 16, log: Callable[[str], None] = print) -> Optional[str]:
  """Encode the train split of `config`'s dataset with its VAE into `output` (default: beside
  the dataset); the directory (worker 0, once committed) or None (other workers). Raises
  latents.LatentsError where `output` holds latents of something else."""
  from semflow_jax import storage
  from semflow_jax.data import latents
  encoder = _Encoder(config, batch_size)
  output = storage.resolve(output or latents.default_dir(encoder.builder, encoder.description))
  if latents.committed(output) is not None:
    latents.open_latents(output).check(encoder.description)
    log(f"the latents are already encoded in {output}")
    return output
  num_examples = encoder.description["num_examples"]
  shards = latents.plan_shards(num_examples, examples_per_shard, num_workers * processes)
  plan = {**encoder.description, "shards": [s.name for s in shards],
          "bounds": [[s.start, s.stop] for s in shards]}
  done = latents.start_or_resume(output, plan, num_workers, log)
  mine = [s for s in shards if s.index % num_workers == worker_index and s.name not in done]
  if mine:
    log(f"writing {len(mine)} of {len(shards)} shards ({num_examples} examples"
        f"{', each also mirrored' if encoder.description['flips'] else ''}) to {output}")
  if processes == 1 or len(mine) <= 1:
    encoder.encode(output, mine)
  else:
    import concurrent.futures
    import multiprocessing
    # Spawned, not forked: the parent has JAX's and TensorFlow's threads running.
    context = multiprocessing.get_context("spawn")
    groups = [g for g in (mine[i::processes] for i in range(processes)) if g]
    log(f"encoding on {len(groups)} processes")
    with concurrent.futures.ProcessPoolExecutor(len(groups), mp_context=context) as pool:
      futures = [pool.submit(_encode_in_child, config, output, group, batch_size)
                 for group in groups]
      for future in futures:
        future.result()
  if worker_index != 0:
    log(f"worker {worker_index} of {num_workers} wrote its shards; worker 0 commits the "
        "latents when all are written")
    return None
  done = latents.wait_for_shards(output, shards, 24 * 3600, log)
  latents.commit(output, encoder.description, shards, done)
  log(f"encoded {num_examples} examples into {output}")
  return output


def main(argv):
  del argv
  shards = _SHARDS.options()
  if _BATCH_SIZE.value < 1:
    raise app.UsageError("--batch_size must be at least 1")
  config = _CONFIG.value
  from semflow_jax import checkpoint, runtime, storage
  runtime.configure_process()  # no TPU start-up without TPUs; the XLA:CPU flags
  try:
    storage.check(_OUTPUT.value, "--output", write=True)
    storage.check(config.data.get("tfds_data_dir"), "config.data.tfds_data_dir")
    storage.check(config.model.get("init_from"), "config.model.init_from")
  except storage.StorageError as e:
    cli.fail(str(e))
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  from semflow_jax.data import latents, manual
  try:
    output = encode_latents(config, _OUTPUT.value, **shards, batch_size=_BATCH_SIZE.value,
                            log=lambda message: print(message, flush=True))
  except (latents.LatentsError, manual.DataError, FileNotFoundError, storage.StorageError,
          checkpoint.ConversionError) as e:
    cli.fail(str(e))
  if output:
    print(f"train from them with --config.data.image_latents={output}", flush=True)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
