"""FID and LPIPS on the device mesh: Inception features and LPIPS distances sharded like
training, and FID statistics of image sets (with an .npz cache format).

  params = weights.load_inception(config.eval.fid_weights)
  extractor = perceptual.InceptionFeatures(params, mesh)
  mu, sigma, _ = perceptual.statistics_of(batches, extractor)
  fid = metrics.frechet_distance(mu, sigma, ref_mu, ref_sigma)

Two ways in, one compiled program each:
- on the device: `extractor.device(images)` / `lpips.device(a, b)` take batch-sharded global
  uint8 arrays (as evaluation already holds them) and return batch-sharded results, without a
  trip through the host (semflow_jax/evaluators/fid.py and lpips.py use these);
- from the host: `extractor(images, mask)` / `lpips.between(a, b, mask)` take this process's
  uint8 numpy batch (B, H, W, 3) and an optional per-example mask (0 = padding); batches may
  also be dicts with "image" and "mask", as `pipeline.eval_batches` yields them. Every process
  gets the rows of the whole global batch back, padding removed, so statistics are the same on
  1 and N processes.
Images are uint8: syntheses are quantised first, as the files pytorch-fid and lpips read are.

The statistics files are .npz with pytorch-fid's keys (`mu`, `sigma`, float64), so statistics
computed by `python -m pytorch_fid --save-stats` can be read as a reference, and ours by it;
ours also record the number of images and a description of what was measured (dataset, split,
image size), and `read_statistics` refuses a file whose description differs from the one asked
for, by name.
"""

import io
import json
import time
from typing import Callable, Iterable, Optional, Tuple

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from semflow_jax import anchors, parallel, storage
from semflow_jax.models import inception as inception_lib
from semflow_jax.models import lpips as lpips_lib
from semflow_jax.programs import Program


def _local_batch(batch) -> Tuple[np.ndarray, np.ndarray]:
  if isinstance(batch, dict):
    images = np.asarray(batch["image"])
    mask = np.asarray(batch["mask"], bool) if "mask" in batch else np.ones(len(images), bool)
  else:
    images, mask = np.asarray(batch), np.ones(len(batch), bool)
  if images.dtype != np.uint8:
    raise TypeError(f"expected uint8 images (quantise syntheses first, as saved files would be), "
                    f"got {images.dtype}")
  return images, mask


class _ShardedNet:
  """A network's params replicated on the mesh and one jitted program from batch-sharded global
  arrays to batch-sharded results."""

  def __init__(self, params, mesh, fn, name: str):
    self.mesh = mesh
    self.params = jax.device_put(params, parallel.replicated(mesh))
    self.program = Program(fn, name=name, out_shardings=parallel.batch_sharding(mesh))
    self._local_size = 0

  def device(self, *global_arrays: jax.Array) -> jax.Array:
    """Batch-sharded global arrays -> batch-sharded results (ShapeDtypeStructs: compiles)."""
    return self.program(self.params, *global_arrays)

  def run(self, *arrays: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-process arrays (leading batch dim) -> host output rows of the valid global examples."""
    n = len(mask)
    # Pad to a multiple of the local devices, and to the largest batch so far (one compile).
    devices = jax.local_device_count()
    self._local_size = max(self._local_size, -(-n // devices) * devices)
    pad = self._local_size - n
    if pad:
      arrays = [np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)]) for a in arrays]
      mask = np.concatenate([mask, np.zeros(pad, bool)])
    batch = parallel.to_global({"x": tuple(arrays), "mask": mask}, self.mesh)
    out = self.device(*batch["x"])
    return np.asarray(_all_rows(out))[np.asarray(_all_rows(batch["mask"]))]


def _all_rows(x: jax.Array) -> np.ndarray:
  """Every row of a batch-sharded global array, on every process."""
  if jax.process_count() == 1:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


class InceptionFeatures:
  """pytorch-fid's pool3 features (2048-d) of uint8 images, sharded over the mesh's batch axes."""

  def __init__(self, params, mesh, precision=jax.lax.Precision.HIGHEST):
    self.module = inception_lib.InceptionV3(precision)
    module = self.module
    self._net = _ShardedNet(params, mesh, lambda p, x: inception_lib.features(p, x, module),
                            "inception_features")

  def device(self, images: jax.Array) -> jax.Array:
    """Global uint8 (B, H, W, 3), batch-sharded -> float32 (B, 2048), batch-sharded."""
    return self._net.device(images)

  def __call__(self, images: np.ndarray, mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-process uint8 (B, H, W, 3) [+ mask] -> float32 (valid examples of the global batch,
    2048), the same on every process."""
    images, mask = _local_batch({"image": images} if mask is None else
                                {"image": images, "mask": mask})
    return self._net.run(images, mask=mask)


def statistics_of(batches: Iterable, extractor: InceptionFeatures, log_every_s: float = 60.0,
                  what: str = "images", between_batches: Optional[Callable[[], None]] = None
                  ) -> Tuple[np.ndarray, np.ndarray, int]:
  """(mu, sigma, number of images) of the pool3 features of every valid image in `batches`.
  `between_batches()` is called before each batch (e.g. to stop by raising)."""
  running = inception_lib.RunningStatistics()
  start = last_log = time.time()
  for batch in batches:
    if between_batches is not None:
      between_batches()
    images, mask = _local_batch(batch)
    running.update(extractor(images, mask))
    if time.time() - last_log > log_every_s:
      last_log = time.time()
      logging.info("FID features of %s: %d images, %.1f images/s", what, running.count,
                   running.count / (last_log - start))
  mu, sigma = running.result()
  return mu, sigma, running.count


def write_statistics(path: str, mu: np.ndarray, sigma: np.ndarray, num_images: int,
                     description: Optional[dict] = None) -> None:
  """An .npz with pytorch-fid's keys (`mu`, `sigma`) plus `num_images` and `description`."""
  buffer = io.BytesIO()
  np.savez(buffer, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64),
           num_images=np.int64(num_images),
           description=np.asarray(json.dumps(description or {}, sort_keys=True)))
  storage.write_bytes(path, buffer.getvalue())


def read_statistics(path: str, description: Optional[dict] = None):
  """(mu, sigma) from an .npz with pytorch-fid's keys; refuses one that describes other data."""
  try:
    f = np.load(io.BytesIO(storage.read_bytes(path)), allow_pickle=False)
    if not isinstance(f, np.lib.npyio.NpzFile):
      raise ValueError(f"an .npy array {getattr(f, 'shape', '')}, not an .npz archive")
    with f:
      mu, sigma = np.asarray(f["mu"], np.float64), np.asarray(f["sigma"], np.float64)
      stored = json.loads(str(f["description"])) if "description" in f.files else None
  except (KeyError, ValueError, OSError) as e:
    raise ValueError(f"{path}: not FID statistics (an .npz with mu and sigma): {e}") from e
  if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
    raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a mean and its "
                     "covariance")
  if description is not None and stored is not None and stored != description:
    raise ValueError(f"{path}: cached FID statistics are of {json.dumps(stored, sort_keys=True)}, "
                     f"not {json.dumps(description, sort_keys=True)}; delete the file (or point "
                     "elsewhere) to recompute")
  return mu, sigma


# -- LPIPS -----------------------------------------------------------------------------------------
class LpipsDistances:
  """LPIPS (AlexNet, v0.1) between uint8 images, sharded over the mesh's batch axes."""

  def __init__(self, params, mesh, precision=jax.lax.Precision.HIGHEST):
    self.module = lpips_lib.LPIPS(precision)
    module = self.module

    def between(p, a, b):
      return module.apply({"params": p}, anchors.to_unit_range(a), anchors.to_unit_range(b))

    self._between = _ShardedNet(params, mesh, between, "lpips")

  def device(self, images_a: jax.Array, images_b: jax.Array) -> jax.Array:
    """Global uint8 (B, H, W, 3) pairs, batch-sharded -> float32 (B,) distances, batch-sharded."""
    return self._between.device(images_a, images_b)

  def between(self, images_a: np.ndarray, images_b: np.ndarray,
              mask: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-process uint8 (B, H, W, 3) pairs -> (valid examples of the global batch,) distances."""
    a, mask = _local_batch({"image": images_a} if mask is None else
                           {"image": images_a, "mask": mask})
    b, _ = _local_batch(images_b)
    return self._between.run(a, b, mask=mask)
