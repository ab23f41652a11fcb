"""Host memory and time of scoring at the label's native size, on the real datasets' sizes.

  python benchmarks/native_labels.py                      # Cityscapes and COCO-Stuff, batch 64
  python benchmarks/native_labels.py --batch_size=16 --num_images=32

Writes fixture downloads in the real on-disk layouts at the real image sizes (Cityscapes
2048x1024; COCO-Stuff 640x480, 480x640, 640x427 and 427x640), builds them with the tfds
builders, then runs the evaluation input pipeline (`eval_batches(native_labels=True)`, images
resized whole to the recipe's model size) and scores random model-size predictions with
`metrics.native_confusion`, as evaluate.py does for each segmentation sampler. Reports the
native-label bytes per batch, the process's peak resident memory over the loop (VmHWM, reset
before it) and the host time per image.
"""

import argparse
import os
import resource
import tempfile
import time

import numpy as np

from semflow_jax import metrics
from semflow_jax.data import pipeline
from tests import dataset_fixtures as fx

COCO_SIZES = ((480, 640), (640, 480), (427, 640), (640, 427))


def _peak_rss_mib() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak_rss():
  with open("/proc/self/clear_refs", "w") as f:  # Linux: "5" resets VmHWM to the current RSS
    f.write("5")


def _build(name, root, num_images):
  if name == "cityscapes_semantic":
    fx.CITYSCAPES_FILES = {"train": fx.CITYSCAPES_FILES["train"][:1],
                           "val": tuple(f"frankfurt/frankfurt_000000_{i:06d}"
                                        for i in range(num_images))}
    fx.write_cityscapes(os.path.join(root, "manual"), size=(1024, 2048))
  else:
    fx.COCO_IDS = {"train2017": (9,), "val2017": tuple(range(100, 100 + num_images))}
    fx.COCO_SIZES = COCO_SIZES
    fx.write_coco_stuff(os.path.join(root, "manual"))
  return fx.build(name, os.path.join(root, "manual"), os.path.join(root, "tfds"))


def measure(name, model_size, num_classes, batch_size, num_images, root) -> dict:
  builder = _build(name, root, num_images)
  preprocess = pipeline.Preprocess("full", model_size)
  rng = np.random.default_rng(0)
  confusion = np.zeros((num_classes, num_classes), np.int64)
  label_bytes, scored, seconds = 0, 0, 0.0
  _reset_peak_rss()
  base = _peak_rss_mib()
  for batch in pipeline.eval_batches(builder, "validation", batch_size, keys=("image", "label"),
                                     preprocess=preprocess, native_labels=True):
    label_bytes = max(label_bytes, batch[pipeline.NATIVE_LABEL_KEY].nbytes)
    predictions = rng.integers(0, num_classes, (batch_size, *model_size)).astype(np.int32)
    start = time.perf_counter()
    confusion += metrics.native_confusion(predictions, batch[pipeline.NATIVE_LABEL_KEY],
                                          batch[pipeline.NATIVE_SIZE_KEY], num_classes,
                                          batch["mask"])
    seconds += time.perf_counter() - start
    scored += int(batch["mask"].sum())
  assert scored == num_images and confusion.sum() > 0
  return {"dataset": name, "model_size": model_size, "batch": batch_size,
          "native_label_mib_per_batch": label_bytes / 2**20,
          "peak_rss_increase_mib": _peak_rss_mib() - base,
          "scoring_ms_per_image": 1000 * seconds / scored}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch_size", type=int, default=64)  # the recipes' eval batch
  parser.add_argument("--num_images", type=int, default=128)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    rows = [measure("cityscapes_semantic", (512, 1024), 19, args.batch_size, args.num_images,
                    os.path.join(tmp, "cityscapes")),
            measure("coco_stuff", (512, 512), 171, args.batch_size, args.num_images,
                    os.path.join(tmp, "coco"))]
  print("| dataset | model size | batch | native labels per batch | peak RSS increase | "
        "scoring per image |")
  print("| --- | --- | --- | --- | --- | --- |")
  for r in rows:
    print(f"| {r['dataset']} | {r['model_size'][0]}x{r['model_size'][1]} | {r['batch']} | "
          f"{r['native_label_mib_per_batch']:.0f} MiB | {r['peak_rss_increase_mib']:.0f} MiB | "
          f"{r['scoring_ms_per_image']:.1f} ms |")


if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  main()
