"""Input pipeline throughput with cached image latents against images, per CPU core.

  python benchmarks/latents_input.py --datasets=celebamask_hq,coco_stuff --batches=12

For each recipe's dataset (stand-in files at the real sizes, benchmarks/pipeline_throughput.py)
the training iterator runs twice with the recipe's preprocessing, batch 16, flips on: reading
and decoding images (what the step then encodes with the VAE), and reading cached latents
(config.data.image_latents: the label decoded, cropped and flipped, the image's moments read as
float32 (2, H/8, W/8, 8) records, 256 KiB each at 512x512) instead. The latents are written with
the real writer (semflow_jax/data/latents.py) but hold random numbers: what they contain does not
change what reading them costs, and encoding 512x512 images with the SD VAE on a CPU would take
long. Examples per CPU-second (process CPU time, all threads) is the per-core rate; wall-clock
examples/s depends on what else runs.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks import pipeline_throughput as bench
from semflow_jax.data import latents, pipeline

LATENT_SCALE = 8  # SD's VAE: H/8 x W/8 latents of 4 channels (moments: 8)


def write_latents(builder, path, image_size, crop):
  """Random moments of the train split's shape, written and committed like an encode's."""
  if latents.committed(path):
    return latents.open_latents(path)
  h, w = (s // LATENT_SCALE for s in image_size)
  n = builder.info.splits["train"].num_examples
  description = {"format": latents.FORMAT, "dataset": builder.info.full_name, "split": "train",
                 "num_examples": n, "image_size": list(image_size),
                 "crop": latents.encoded_crop(crop), "flips": True, "shape": [2, h, w, 8],
                 "dtype": latents.DTYPE, "vae": {"fingerprint": "benchmark (random moments)",
                                                 "config": None, "init_from": None}}
  shards = latents.plan_shards(n, 1000)
  latents.start_or_resume(path, {**description, "shards": [s.name for s in shards]}, 1, print)
  rng = np.random.default_rng(0)
  done = {}
  for shard in shards:
    moments = [rng.standard_normal((2, h, w, 8)).astype(np.float32)
               for _ in range(shard.start, shard.stop)]
    done[shard.name] = latents.write_shard(path, shard, moments)
  latents.commit(path, description, shards, done)
  return latents.open_latents(path)


def measure(name, workdir, num_examples, batches, batch_size=16):
  builder = bench.prepare(name, workdir, num_examples)
  data = bench.CONFIGS[name].get_config().data
  preprocess = pipeline.Preprocess.from_config(data)
  cached = write_latents(builder, os.path.join(workdir, f"latents_{name}"), data.image_size,
                         data.crop)
  results = {}
  for source in ("images", "latents"):
    it = pipeline.TrainIterator(builder, batch_size, seed=0, preprocess=preprocess,
                                latents=cached if source == "latents" else None)
    for _ in range(num_examples // batch_size):  # warm-up: one epoch, page cache, threads
      next(it)
    start, cpu_start = time.perf_counter(), time.process_time()
    for _ in range(batches):
      batch = next(it)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    it.close()
    results[source] = {"examples_per_s": batches * batch_size / seconds,
                       "examples_per_cpu_s": batches * batch_size / cpu_seconds,
                       "keys": {k: v.shape[1:] for k, v in batch.items()}}
  return results


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--datasets", default="celebamask_hq,coco_stuff")
  parser.add_argument("--examples", type=int, default=64, help="training examples written")
  parser.add_argument("--batches", type=int, default=12, help="timed batches of 16")
  parser.add_argument("--workdir", default=None, help="reuse written and built data here")
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="latents_bench_")
  print(f"CPU cores available to this process: {len(os.sched_getaffinity(0))}")
  print("| dataset | input | per-example arrays | examples/s (wall) | examples per CPU-second |")
  print("| --- | --- | --- | --- | --- |")
  for name in args.datasets.split(","):
    for source, r in measure(name, workdir, args.examples, args.batches).items():
      arrays = ", ".join(f"{k} {'x'.join(map(str, s))}" for k, s in r["keys"].items())
      print(f"| {name} | {source} | {arrays} | {r['examples_per_s']:.1f} | "
            f"{r['examples_per_cpu_s']:.1f} |", flush=True)


if __name__ == "__main__":
  main()
