"""Training input pipeline throughput (examples/s) on stand-in datasets at the real file sizes.

  taskset -c 0 python benchmarks/pipeline_throughput.py      # one CPU core
  python benchmarks/pipeline_throughput.py --datasets=cityscapes_semantic --batches=20
  python benchmarks/pipeline_throughput.py --pipeline=legacy   # the pipeline before issue 18

Writes small trees in the official layouts with images of the real dimensions (COCO 640x480
JPEG, Cityscapes 2048x1024 PNG, CelebA-HQ 1024x1024 JPEG with 512x512 part masks), builds them
with the real builders (ArrayRecord; TFRecord for --pipeline=legacy), then times the training
iterator with each dataset config's preprocessing (512x512 square crops; 512x1024 full frames
for Cityscapes), batch 16, flips on, after one warm-up epoch (the legacy pipeline's fills its
encoded cache, as on a long run; the page cache holds the files for both). Examples per
CPU-second (process CPU time, all threads) is the per-core rate and does not depend on what
else runs on the machine; wall-clock examples/s does. The images are
smooth colour fields with region colours and pixel noise, so their encoded sizes (printed) are
close to the real ones and decoding costs about the same.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import celebamask_hq as celeba_config
from configs import cityscapes as cityscapes_config
from configs import coco_stuff as coco_config
from semflow_jax.data import celebamask_hq, pipeline, records

CONFIGS = {"coco_stuff": coco_config, "cityscapes_semantic": cityscapes_config,
           "celebamask_hq": celeba_config}


def _layout(rng, height, width, values, cells=6):
  """Large label regions: a coarse random grid of `values`, upsampled (nearest)."""
  grid = rng.choice(values, (cells, cells * width // height + 1))
  rows = np.arange(height) * cells // height
  cols = np.arange(width) * grid.shape[1] // width
  return grid[rows][:, cols].astype(np.uint8)


def _photo(rng, labels, noise=5.0):
  """Per-region colours, a smooth field on top and pixel noise."""
  h, w = labels.shape
  colours = rng.uniform(30, 220, (256, 3))
  yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
  field = 25 * np.stack([np.sin(6 * xx + c) * np.cos(4 * yy - c) for c in range(3)], -1)
  image = colours[labels] + field + rng.normal(0, noise, (h, w, 3))
  return np.clip(image, 0, 255).astype(np.uint8)


def _save(path, array, **kwargs):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path, **kwargs)


def write_coco(root, n, rng):
  used = [r for r in range(182) if r not in (11, 25, 28, 29, 44, 65, 67, 68, 70, 82, 90)]
  for split in ("train2017", "val2017"):
    for i in range(n if split == "train2017" else 1):
      h, w = (480, 640) if i % 3 else (640, 480)
      labels = _layout(rng, h, w, used + [255])
      # Noisier than the others: COCO photos average about 160 KB as JPEG.
      _save(f"{root}/{split}/{i + 1:012d}.jpg", _photo(rng, labels, noise=14.0), quality=90)
      _save(f"{root}/stuffthingmaps_trainval2017/{split}/{i + 1:012d}.png", labels)


def write_cityscapes(root, n, rng):
  for split in ("train", "val"):
    for i in range(n if split == "train" else 1):
      labels = _layout(rng, 1024, 2048, np.arange(34))
      key = f"aachen/aachen_{i:06d}_000019"
      _save(f"{root}/leftImg8bit/{split}/{key}_leftImg8bit.png", _photo(rng, labels, noise=2.0))
      _save(f"{root}/gtFine/{split}/{key}_gtFine_labelIds.png", labels)


def write_celeba(root, n, rng):
  for i in list(range(n)) + [28000]:
    parts = _layout(rng, 512, 512, np.arange(len(celebamask_hq.PARTS) + 1), cells=8)
    image = _photo(rng, np.kron(parts, np.ones((2, 2), np.uint8)))
    _save(f"{root}/CelebA-HQ-img/{i}.jpg", image, quality=95)
    for p, part in enumerate(celebamask_hq.PARTS):
      if (parts == p + 1).any():
        _save(f"{root}/CelebAMask-HQ-mask-anno/{i // 2000}/{i:05d}_{part}.png",
              (parts == p + 1).astype(np.uint8) * 255)


WRITERS = {"coco_stuff": write_coco, "cityscapes_semantic": write_cityscapes,
           "celebamask_hq": write_celeba}


PIPELINES = ("random_access", "legacy")


def prepare(name, workdir, num_examples, pipeline_name="random_access"):
  """The built dataset (written and built once per workdir): ArrayRecord, or TFRecord for the
  legacy pipeline."""
  manual_dir = os.path.join(workdir, "manual", name)
  if not os.path.isdir(manual_dir):
    WRITERS[name](manual_dir, num_examples, np.random.default_rng(0))
  if pipeline_name == "legacy":
    builder = tfds.builder(name, data_dir=os.path.join(workdir, "tfds_tfrecord"),
                           file_format="tfrecord")
    if not builder.is_prepared():
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    return builder
  return records.prepare(tfds.builder(name, data_dir=os.path.join(workdir, "tfds")), manual_dir)


def stored_sizes(builder):
  """(mean image KB, mean label KB) as stored."""
  if records.is_array_record(builder):
    raw = builder.as_data_source("train",
                                 deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)
    features = [tf.train.Example.FromString(r).features.feature for r in raw]
    sizes = [(len(f["image"].bytes_list.value[0]), len(f["label"].bytes_list.value[0]))
             for f in features]
  else:
    stored = tfds.as_numpy(builder.as_dataset(split="train", decoders={
        "image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}))
    sizes = [(len(ex["image"]), len(ex["label"])) for ex in stored]
  return tuple(np.mean(sizes, axis=0) / 1024)


def iterator(builder, pipeline_name, batch_size, preprocess):
  if pipeline_name == "legacy":
    from benchmarks import legacy_pipeline
    return legacy_pipeline.train_batches(builder, batch_size, seed=0, preprocess=preprocess)
  return pipeline.TrainIterator(builder, batch_size, seed=0, preprocess=preprocess)


def measure(name, workdir, num_examples, batches, batch_size=16, pipeline_name="random_access"):
  builder = prepare(name, workdir, num_examples, pipeline_name)
  image_kb, label_kb = stored_sizes(builder)
  preprocess = pipeline.Preprocess.from_config(CONFIGS[name].get_config().data)
  it = iterator(builder, pipeline_name, batch_size, preprocess)
  per_epoch = builder.info.splits["train"].num_examples // batch_size
  for _ in range(per_epoch):  # warm-up: fills caches, starts the threads
    next(it)
  start, cpu_start = time.perf_counter(), time.process_time()
  for _ in range(batches):
    batch = next(it)
  seconds = time.perf_counter() - start
  cpu_seconds = time.process_time() - cpu_start  # all threads; robust to other load
  return {"dataset": name, "pipeline": pipeline_name, "output": batch["image"].shape[1:3],
          "examples_per_s": batches * batch_size / seconds,
          "examples_per_cpu_s": batches * batch_size / cpu_seconds,
          "image_kb": image_kb, "label_kb": label_kb}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--datasets", default=",".join(WRITERS))
  parser.add_argument("--examples", type=int, default=64, help="training examples written")
  parser.add_argument("--batches", type=int, default=12, help="timed batches of 16")
  parser.add_argument("--workdir", default=None, help="reuse written and built data here")
  parser.add_argument("--pipeline", default="random_access", choices=PIPELINES)
  args = parser.parse_args()
  workdir = args.workdir or tempfile.mkdtemp(prefix="pipeline_bench_")
  cores = len(os.sched_getaffinity(0))
  print(f"CPU cores available to this process: {cores}")
  print("| dataset | output HxW | stored image KB | stored label KB | examples/s (wall) | "
        "examples per CPU-second |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name in args.datasets.split(","):
    r = measure(name, workdir, args.examples, args.batches, pipeline_name=args.pipeline)
    print(f"| {name} | {r['output'][0]}x{r['output'][1]} | {r['image_kb']:.0f} | "
          f"{r['label_kb']:.0f} | {r['examples_per_s']:.1f} | "
          f"{r['examples_per_cpu_s']:.1f} |", flush=True)


if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  main()
