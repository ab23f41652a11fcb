"""Segment and synthesise from files, with a trained checkpoint from a workdir.

Inputs of any size are resized to the model's resolution (bicubic for images, nearest for label
maps) and outputs come back at the input's size. Bad input raises `InputError`, whose one-line
message names the file and the problem.
"""

import io

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from PIL import Image, UnidentifiedImageError

from semflow_jax import anchors, images, parallel, state, storage
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow


class InputError(ValueError):
  """A user-supplied file is missing, unreadable or not what the mode needs."""


def _open(path: str) -> Image.Image:
  if not path:
    raise InputError("--input is required for this mode")
  if not storage.is_file(path):
    raise InputError(f"{path}: no such file")
  try:
    image = Image.open(io.BytesIO(storage.read_bytes(path)))
    image.load()
  except (UnidentifiedImageError, OSError, SyntaxError) as e:
    raise InputError(f"{path}: not a readable image ({e.__class__.__name__}: {e})") from None
  return image


def read_image(path: str) -> np.ndarray:
  """Any PIL-readable image -> uint8 (H, W, 3); alpha is dropped, grey is replicated."""
  return np.asarray(_open(path).convert("RGB"))


def read_label_map(path: str, num_classes: int) -> np.ndarray:
  """A single-channel PNG of class ids (255 = ignore) -> uint8 (H, W)."""
  image = _open(path)
  if image.mode not in ("L", "P", "I", "I;16"):
    raise InputError(f"{path}: not a single-channel label map (mode {image.mode} with "
                     f"{len(image.getbands())} channels); expected 8-bit class ids")
  labels = np.asarray(image).astype(np.int64)
  bad = np.setdiff1d(np.unique(labels), np.r_[np.arange(num_classes), anchors.IGNORE_LABEL])
  if bad.size:
    shown = ", ".join(str(v) for v in bad[:8]) + (", ..." if bad.size > 8 else "")
    raise InputError(f"{path}: label values {shown} are outside the dataset's classes "
                     f"0..{num_classes - 1} (255 = ignore)")
  return labels.astype(np.uint8)


def _check_output(path: str, what: str) -> str:
  if not path:
    raise InputError(f"--output is required ({what})")
  return storage.resolve(path)


def _resize(array: np.ndarray, size, resample) -> np.ndarray:
  """(H, W[, C]) uint8 -> (size[0], size[1][, C])."""
  if array.shape[:2] == tuple(size):
    return array
  return np.asarray(Image.fromarray(array).resize((size[1], size[0]), resample))


def _load(config, workdir):
  mesh = parallel.make_mesh(config)
  params, step = state.load_params(config, workdir, mesh)
  logging.info("loaded checkpoint at step %d from %s", step, workdir)
  return SemFlow.from_config(config), params


def segment_file(config: ml_collections.ConfigDict, workdir: str, input_path: str,
                 output_path: str) -> np.ndarray:
  """Write the label map of `input_path` to `output_path` and a preview beside it."""
  output_path = _check_output(output_path, "the label map PNG to write")
  image = read_image(input_path)
  model, params = _load(config, workdir)
  s = config.sample
  segment = Programs(model).segment(s.seg_steps, s.method)
  labels = np.asarray(segment(params, _resize(image, model.image_size, Image.BICUBIC)[None]))[0]
  labels = _resize(labels.astype(np.uint8), image.shape[:2], Image.NEAREST)
  images.write_png(output_path, labels)
  preview = storage.join(storage.parent(output_path),
                         storage.as_path(output_path).stem + "_preview.png")
  images.write_png(preview, images.colourise(labels))
  logging.info("wrote %s and %s", output_path, preview)
  return labels


def synthesize_file(config: ml_collections.ConfigDict, workdir: str, input_path: str,
                    output_dir: str, num_samples: int) -> list:
  """Write `num_samples` images synthesised from the label map `input_path` into `output_dir`."""
  output_dir = _check_output(output_dir, "the directory to write samples into")
  if num_samples < 1:
    raise InputError(f"--num_samples must be >= 1, got {num_samples}")
  labels = read_label_map(input_path, config.data.num_classes)
  model, params = _load(config, workdir)
  s = config.sample
  synthesize = Programs(model).synthesize(s.synth_steps, s.method)
  small = _resize(labels, model.image_size, Image.NEAREST)
  batch = jnp.broadcast_to(jnp.asarray(small)[None], (num_samples, *small.shape))
  out = np.asarray(anchors.from_unit_range(synthesize(params, batch, jax.random.PRNGKey(s.seed))))
  paths = []
  for i, x in enumerate(out):
    path = storage.join(output_dir, f"sample_{i}.png")
    images.write_png(path, _resize(x, labels.shape, Image.BICUBIC))
    paths.append(path)
  logging.info("wrote %d samples to %s", num_samples, output_dir)
  return paths
