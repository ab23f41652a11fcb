"""Cached image latents: the SD-VAE posterior's moments of every training image, by index.

  python -m semflow_jax.data.encode --config=configs/celebamask_hq.py \
      --config.model.init_from=gs://my-bucket/sd15 --config.data.tfds_data_dir=gs://my-bucket/tfds
  python -m semflow_jax.main --config=configs/celebamask_hq.py ... \
      --config.data.image_latents=<the directory it printed>

What is stored. Record i (ArrayRecord, one record per chunk, uncompressed) is example i of the
train split: float32 (V, h, w, 2C), little-endian, the mean and log-variance of the VAE's
posterior (`SemFlow.image_moments`) of the image as the training pipeline prepares it, with
V = 2 where the recipe flips (the image as stored, then mirrored: the VAE is not
mirror-equivariant, so the mirrored image is encoded rather than the moments mirrored), else 1.
A run samples z0 from them every step (`SemFlow.latent_from_moments`, the noise encoding would
draw), and the labels still go through the pipeline: the example's flip picks the variant.

Crops. Deterministic crops ('none', 'full', 'center') are encoded as the pipeline makes them. A
random crop (COCO-Stuff's 512^2 squares) changes every epoch and cannot be cached; the latents
hold the centre crop (the largest centred window with the output's aspect ratio, the pipeline's
'center') and a run from them crops the labels the same way (`encoded_crop`): the MLPerf Stable
Diffusion recipe's and maxdiffusion's choice (centre crop, random flip). The crop's position no
longer varies; the flip still does. Caching K random crops per example would cost K times the
storage and was not done.

Layout of a latents directory (local or gs://):
  train-<i>-of-<n>.array_record   consecutive examples; each file appears whole under its name
                                  (written to a local file, then renamed or uploaded)
  .encode/plan.json, .encode/done/<shard>.json   an encode's progress; removed at the commit
  latents.json                    written last: what the latents are (dataset, split size, image
                                  size, crop, flips, shape, dtype, the VAE's fingerprint and
                                  config, the shards). A directory without it is not used.

The VAE's identity is `fingerprint(vae_params)`: checksums of every parameter's bits, computed
on the devices in integer arithmetic (exact under any sharding or process count), hashed with
the parameter names and shapes. Training compares it, the image size, the crop, the flips and
the dataset with the run's own before reading anything (`Latents.check`): a mismatch is one line
naming latents.json and what differs (`LatentsError`).
"""

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

import numpy as np

from semflow_jax import storage

KEY = "image_moments"        # the batch key (step.py)
METADATA = "latents.json"
FORMAT = "semflow_jax image latents 1"
DTYPE = "float32"
_PROGRESS = ".encode"


class LatentsError(ValueError):
  """Latents that do not fit the run (or a directory that holds none): one line, naming the file."""


def encoded_crop(crop: str) -> str:
  """The crop the latents of a config with `config.data.crop` = crop are encoded with."""
  return "center" if crop == "random" else crop


def fingerprint(vae_params) -> str:
  """A hex digest identifying the VAE's parameter values, wherever and however they are laid out.

  Per parameter, two sums of its 32-bit patterns modulo 2^32 (plain, and weighted by an odd
  function of the element's position, so moved values count), computed by a jitted function
  (a collective in a multi-process run: every process calls it). Integer sums do not depend on
  the order of the reduction, so any sharding gives the same digest.
  """
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  flat = traverse_util.flatten_dict(dict(vae_params), sep="/")
  names = sorted(flat)
  sharding = getattr(flat[names[0]], "sharding", None)
  # Replicated results: readable on every process when the parameters span several (FSDP).
  replicated = (jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
                if isinstance(sharding, jax.sharding.NamedSharding) else None)

  def sums(leaves):
    out = []
    for x in leaves:
      bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
      position = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
      weight = position * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9) | jnp.uint32(1)
      out.append(jnp.stack([jnp.sum(bits, dtype=jnp.uint32),
                            jnp.sum(bits * weight, dtype=jnp.uint32)]))
    return out

  values = jax.device_get(jax.jit(sums, out_shardings=replicated)([flat[n] for n in names]))
  digest = hashlib.sha256()
  for name, value in zip(names, values):
    digest.update(f"{name}:{tuple(flat[name].shape)}:{[int(v) for v in value]};".encode())  # pyright: ignore[reportAttributeAccessIssue]
  return digest.hexdigest()[:32]


def describe(config, builder, model, vae_fingerprint: str) -> dict:
  """What latents of this run's train split, image size, crop, flips and VAE are (latents.json
  without its shards): what an encode writes and what a run expects."""
  h, w = model.image_size
  lh, lw, c = model.latent_shape
  flips = bool(config.data.get("flip", True))
  vae_config = config.model.get("vae_config")
  return {
      "format": FORMAT,
      "dataset": builder.info.full_name,
      "split": "train",
      "num_examples": builder.info.splits["train"].num_examples,
      "image_size": [int(h), int(w)],
      "crop": encoded_crop(config.data.get("crop", "none")),
      "flips": flips,
      "shape": [2 if flips else 1, int(lh), int(lw), 2 * int(c)],
      "dtype": DTYPE,
      "vae": {"fingerprint": vae_fingerprint,
              "config": vae_config.to_dict() if vae_config is not None else None,
              "init_from": config.model.get("init_from")},
  }


def default_dir(builder, description: dict) -> str:
  """Beside the tfds dataset: <data dir>/<name>/<config>/latents-<version>-<HxW>-<crop>-<VAE>."""
  h, w = description["image_size"]
  data_path = os.fspath(builder.data_path)
  name = (f"latents-{os.path.basename(data_path)}-{h}x{w}-{description['crop']}"
          f"{'-flips' if description['flips'] else ''}-{description['vae']['fingerprint'][:12]}")
  return storage.join(storage.parent(data_path), name)


# -- reading --------------------------------------------------------------------------------------

def _quote(value) -> str:
  if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
    return f"{value[0]}x{value[1]}"
  return json.dumps(value)


class Latents:
  """Committed latents (`open`): `source` (records by example index), `metadata`, `path`."""

  KEY = KEY

  def __init__(self, path: str, metadata: dict):
    from semflow_jax.data import records
    self.path, self.metadata = path, metadata
    self.shape = tuple(metadata["shape"])
    self.source = records.Records.of_files(
        [(storage.join(path, s["name"]), s["num_examples"]) for s in metadata["shards"]],
        metadata["split"])

  @property
  def file(self) -> str:
    return storage.join(self.path, METADATA)

  def check(self, expected: dict) -> None:
    """Refuse latents that are not the run's (`describe`): one LatentsError naming the file and
    the first difference. Latents with flips serve a run without (the stored variant is used)."""
    got = self.metadata
    vae, want_vae = got["vae"]["fingerprint"], expected["vae"]["fingerprint"]
    if vae != want_vae:
      raise LatentsError(
          f"{self.file}: encoded with another VAE (fingerprint {vae[:12]}, from init_from="
          f"{got['vae'].get('init_from')}) than this run's (fingerprint {want_vae[:12]}, from "
          f"config.model.init_from={expected['vae'].get('init_from')}); encode them again with "
          "this config")
    checks = [("image_size", "config.data.image_size"), ("crop", "config.data.crop (encoded as)"),
              ("dataset", "config.data (the tfds dataset)"),
              ("num_examples", "the train split's examples"),
              ("shape", "the model's moments (flips, h, w, 2 x latent channels)")]
    for key, what in checks:
      if key == "shape" and got["flips"] and not expected["flips"]:
        continue
      if key == "shape" and not got["flips"] and expected["flips"]:
        raise LatentsError(f"{self.file}: encoded without mirrored images, but config.data.flip "
                           "is True; encode them again with this config (or set "
                           "--config.data.flip=False)")
      if got.get(key) != expected[key]:
        raise LatentsError(f"{self.file}: {key} is {_quote(got.get(key))}, this run's {what} "
                           f"is {_quote(expected[key])}; encode them again with this config")
    if got.get("dtype") != DTYPE:
      raise LatentsError(f"{self.file}: dtype {got.get('dtype')}, expected {DTYPE}")

  def preprocess(self, preprocess):
    """The labels' preprocessing: the crop the images were encoded with (`encoded_crop`)."""
    return dataclasses.replace(preprocess, crop=encoded_crop(preprocess.crop))

  def moments(self, record, flip):
    """tf: one record -> the (h, w, 2C) float32 moments of the image, mirrored when `flip`."""
    import tensorflow as tf
    variants = tf.reshape(tf.io.decode_raw(record, tf.float32, little_endian=True), self.shape)
    if self.shape[0] == 1:
      return variants[0]
    return tf.cond(flip, lambda: variants[1], lambda: variants[0])


def open_latents(path: str) -> Latents:
  """The committed latents in directory `path`; LatentsError when it holds none (or an
  interrupted encode)."""
  path = storage.resolve(path)
  file = storage.join(path, METADATA)
  if not storage.exists(file):
    state = ("an interrupted encode (run the same encode command again to finish it)"
             if storage.exists(storage.join(path, _PROGRESS)) else "no latents")
    raise LatentsError(f"{file}: not found; config.data.image_latents={path} holds {state} "
                       "(python -m semflow_jax.data.encode writes them)")
  try:
    metadata = storage.read_json(file)
  except ValueError as e:
    raise LatentsError(f"{file}: not JSON ({e})") from None
  if metadata.get("format") != FORMAT:
    raise LatentsError(f"{file}: format {metadata.get('format')!r}, expected {FORMAT!r}")
  return Latents(path, metadata)


# -- writing ------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Shard:
  index: int
  num_shards: int
  start: int  # examples [start, stop) of the split
  stop: int

  @property
  def name(self) -> str:
    return f"train-{self.index:05d}-of-{self.num_shards:05d}.array_record"


def plan_shards(num_examples: int, examples_per_shard: int, min_shards: int = 1) -> List[Shard]:
  count = max(1, min(num_examples, max(min_shards, -(-num_examples // examples_per_shard))))
  bounds = [round(i * num_examples / count) for i in range(count + 1)]
  return [Shard(i, count, bounds[i], bounds[i + 1]) for i in range(count)]


def _done(path: str) -> Dict[str, dict]:
  done_dir = storage.join(path, _PROGRESS, "done")
  if not storage.is_dir(done_dir):
    return {}
  return {n[:-len(".json")]: storage.read_json(storage.join(done_dir, n))
          for n in storage.listdir(done_dir) if n.endswith(".json")}


def start_or_resume(path: str, plan: dict, num_workers: int, log: Callable[[str], None]) -> dict:
  """{shard name: done record} of an encode of `plan` into `path` (an interrupted one of the
  same plan continues; one of another plan is started over, or refused with several workers)."""
  plan_file = storage.join(path, _PROGRESS, "plan.json")
  plan = json.loads(json.dumps(plan))  # as read back (tuples become lists)
  if storage.exists(plan_file):
    if storage.read_json(plan_file) == plan:
      return _done(path)
    if num_workers > 1:
      raise LatentsError(f"{plan_file}: an interrupted encode of other latents (another VAE, "
                         "image size or shards); remove it, or rerun with the config and flags "
                         "it was started with")
    log(f"{plan_file}: an interrupted encode of other latents; starting over")
    for name in storage.listdir(path):
      if name.endswith(".array_record") or name == _PROGRESS:
        storage.remove_tree(storage.join(path, name))
  storage.makedirs(storage.join(path, _PROGRESS, "done"))
  storage.write_json(plan_file, plan)
  return {}


def write_shard(path: str, shard: Shard, moments: Sequence[np.ndarray]) -> dict:
  """Write one shard's records (float32 arrays of the latents' shape) so that the file appears
  whole under its name, then mark the shard done."""
  from array_record.python import array_record_module  # pyright: ignore[reportAttributeAccessIssue]
  from semflow_jax.data import records
  target = storage.join(path, shard.name)
  local_dir = (tempfile.mkdtemp(prefix="semflow_latents_") if storage.is_url(path)
               else storage.join(path, _PROGRESS))
  local = os.path.join(local_dir, f".{shard.name}.tmp-{os.getpid()}")
  try:
    writer = array_record_module.ArrayRecordWriter(local, records.WRITER_OPTIONS)
    try:
      for m in moments:
        writer.write(np.ascontiguousarray(m, dtype="<f4").tobytes())
    finally:
      writer.close()
    size = os.path.getsize(local)
    if storage.is_url(path):
      storage.as_path(local).copy(storage.as_path(target), overwrite=True)  # appears whole
    else:
      os.replace(local, target)
  finally:
    if os.path.exists(local):
      os.remove(local)
    if storage.is_url(path):
      shutil.rmtree(local_dir, ignore_errors=True)
  done = {"name": shard.name, "num_examples": len(moments), "num_bytes": size}
  storage.write_json(storage.join(path, _PROGRESS, "done", f"{shard.name}.json"), done)
  return done


def wait_for_shards(path: str, shards: List[Shard], wait_s: float,
                    log: Callable[[str], None]) -> Dict[str, dict]:
  """{shard name: done record} once every shard of the encode into `path` is done."""
  from semflow_jax.data import records
  return records.wait_for_shards(path, lambda: _done(path), shards, wait_s, log)


def commit(path: str, description: dict, shards: List[Shard], done: Dict[str, dict]) -> dict:
  """Write latents.json (the latents exist from then on), then drop the encode's progress."""
  metadata = {**description,
              "shards": [{"name": s.name, "num_examples": done[s.name]["num_examples"]}
                         for s in shards]}
  total = sum(s["num_examples"] for s in metadata["shards"])
  if total != description["num_examples"]:
    raise LatentsError(f"{path}: the shards hold {total} examples, the split "
                       f"{description['num_examples']}")
  storage.write_json(storage.join(path, METADATA), metadata)
  storage.remove_tree(storage.join(path, _PROGRESS))
  return metadata


def committed(path: str) -> Optional[dict]:
  """latents.json of `path`, or None."""
  file = storage.join(path, METADATA)
  return storage.read_json(file) if storage.exists(file) else None
