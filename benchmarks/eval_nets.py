"""Throughput of the FID and LPIPS networks as evaluation runs them (semflow_jax.perceptual).

  python benchmarks/eval_nets.py                          # all local devices, 256x256 images
  python benchmarks/eval_nets.py --image_size=512 --batch=16 --repeats=5

Random weights of the real shapes (speed does not depend on the values). Times
`InceptionFeatures` (uint8 -> 299 resize -> 2048-d pool3, float32, precision HIGHEST) and
`LpipsDistances.between` (AlexNet, v0.1 heads) on one batch after a compile-and-warm-up call.
Prints wall-clock images/s and process CPU-seconds per image (all threads; unlike wall time it
does not depend on what else runs on a shared machine).
"""

import argparse
import time

import jax
import numpy as np
from jax.sharding import Mesh

from semflow_jax import perceptual
from semflow_jax.models import inception, lpips


def _random_params(abstract, seed):
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (0.05 * rng.normal(size=s.shape)).astype(np.float32), abstract)


def _time(fn, repeats):
  fn()  # compile and warm up
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(repeats):
    fn()
  return time.perf_counter() - wall, time.process_time() - cpu


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args()
  mesh = Mesh(np.asarray(jax.devices()).reshape(-1, 1), ("data", "fsdp"))
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, args.image_size, args.image_size, 3), np.uint8)
  n = args.batch * args.repeats
  print(f"{jax.device_count()} x {jax.devices()[0].device_kind}, batch {args.batch} of "
        f"{args.image_size}x{args.image_size} uint8")

  extractor = perceptual.InceptionFeatures(_random_params(inception.abstract_params(), 0), mesh)
  wall, cpu = _time(lambda: extractor(images), args.repeats)
  print(f"FID InceptionV3 features: {n / wall:.2f} images/s, {cpu / n:.2f} CPU-s/image")

  scorer = perceptual.LpipsDistances(_random_params(lpips.abstract_params(), 1), mesh)
  wall, cpu = _time(lambda: scorer.between(images, images[::-1]), args.repeats)
  print(f"LPIPS (AlexNet) distances: {n / wall:.2f} pairs/s, {cpu / n:.2f} CPU-s/pair")


if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  main()
