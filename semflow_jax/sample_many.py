"""Segment or synthesise a whole folder (or glob) of files, or a split of the config's dataset,
in one run: one `sample.Predictor`, compiled once, batches of `devices x rows` at the model's
size over every device of every process (each process its own inputs: sorted names,
round-robin), resumable (inputs whose outputs all exist are skipped), a progress line.

Inputs of any size are resized to the model's resolution as the input pipeline resizes a
dataset's examples (`resize.image`, `resize.labels`) and outputs come back at each input's size;
the last batch is padded, so one program serves every batch. Segmentations are written as class
ids and in the dataset's official ids (`image_files.write_segmentation`); synthesis keys each
sample by its input's name and sample index, so a folder gives what single-file calls give. An
unreadable input is skipped with a warning and the run then ends with `InputError` naming it.
"""

import concurrent.futures
import dataclasses
import functools
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

from semflow_jax import image_files, images, resize, storage
from semflow_jax.image_files import InputError, check_output
from semflow_jax.sample import Predictor

GLOB_CHARACTERS = "*?["
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


def list_inputs(input_spec: Optional[str], extensions: Sequence[str]) -> List[Item]:
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
  output_dir = check_output(output_dir, "a directory (labels/<name>.png for every input)",
                            directory=True)
  folders = image_files.segmentation_folders(config.data.name)

  def outputs_of(name):
    return [f"{folder}/{name}.png" for folder in folders]

  def write(row, labels):
    name, size = row[0], row[1]
    image_files.write_segmentation(output_dir, name, resize.labels(labels, size),
                                   config.data.name)

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
    image = image_files.read_image(item.path)
    return (item.name, image.shape[:2]), (resize.image(image, size),)

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
    images.write_png(storage.join(output_dir, f"{name}_{i}.png"), resize.image(image, size))

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
    labels = image_files.read_label_map(item.path, predictor.num_classes)
    return labels.shape, resize.labels(labels, size)

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
