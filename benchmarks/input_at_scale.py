"""Input at pod scale (issue 18): the random-access pipeline against the one before it, side by side.

  python benchmarks/input_at_scale.py --workdir=/tmp/input_bench     # both parts, ~5 minutes

Part 1, start-up: time from process start to the first training batch, and the bytes the
process reads from storage between its imports and that batch (/proc/self/io `rchar`: every
read and pread, page cache hits included), against the split size (2,000 / 20,000 / 100,000
small examples: 32x32 synthetic scenes, about 3 KB each) and the process count (1 / 8 / 64,
per-process batch 16). Each measurement is a fresh process: process 0 of P (jax.process_index
and process_count set to (0, P); every process of a job does the same work). The legacy
pipeline reads the TFRecord build of the same examples, the random-access one the ArrayRecord
build; both run the same per-example decoding.

Part 2, throughput: examples per CPU-second (process CPU time, all threads: what one busy core
delivers, robust to other load) of each pipeline on the COCO-Stuff-, Cityscapes- and
CelebAMask-HQ-shaped fixtures of benchmarks/pipeline_throughput.py (64 examples at the real
dimensions, each dataset config's crop and resize, batch 16, after one warm-up epoch), each
measurement in a fresh process, the two pipelines alternating.

The datasets are written once into --workdir and reused by later runs (delete it to rebuild).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (2_000, 20_000, 100_000)
PROCESS_COUNTS = (1, 8, 64)
BATCH = 16
POOL = 1000  # distinct synthetic scenes the start-up datasets cycle through


def _rchar() -> int:
  with open("/proc/self/io") as f:
    return int(next(line for line in f if line.startswith("rchar:")).split()[1])


# -- the start-up datasets ---------------------------------------------------------------------

_CLASS = []


def _scenes_builder_class():
  """A tfds builder of N stored 32x32 synthetic scenes (a cycle through POOL rendered ones,
  PNG-encoded once, so that 100,000 examples build in seconds)."""
  if _CLASS:
    return _CLASS[0]
  import tensorflow_datasets as tfds

  from semflow_jax.data import records

  class StartupScenes(records.RandomAccessBuilder):
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=f"n{n}") for n in SIZES]
    LOAD_IN_THREADS = False

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(32, 32, 3)),
              "image_alt": tfds.features.Image(shape=(32, 32, 3)),
              "label": tfds.features.Image(shape=(32, 32, 1)),
              "file_name": tfds.features.Text()}),
          disable_shuffling=True)

    def split_items(self, manual_dir):
      n = int(self.builder_config.name[1:])
      return {"train": list(range(n)), "validation": list(range(16))}

    def load_example(self, index):
      return index, {**_pool()[index % POOL], "file_name": f"train_{index:06d}"}

  _CLASS.append(StartupScenes)
  return StartupScenes


_POOL = []


def _pool():
  if not _POOL:
    import io

    from PIL import Image

    from semflow_jax.data import synthetic

    def png(array):
      buffer = io.BytesIO()
      Image.fromarray(array.squeeze()).save(buffer, format="PNG")
      return buffer.getvalue()
    for i in range(POOL):
      ex = synthetic.generate_example(0, "train", i, 32)
      _POOL.append({k: png(ex[k]) for k in ("image", "image_alt", "label")})
  return _POOL


def _scenes(workdir, n, legacy):
  cls = _scenes_builder_class()
  if legacy:
    builder = cls(config=f"n{n}", data_dir=os.path.join(workdir, "tfds_tfrecord"),
                  file_format="tfrecord")
    if not builder.is_prepared():
      builder.download_and_prepare()
    return builder
  from semflow_jax.data import records
  return records.prepare(cls(config=f"n{n}", data_dir=os.path.join(workdir, "tfds")))


def startup_child(workdir, n, processes, legacy, started):
  """In a fresh process: build the iterator as process 0 of `processes`, take one batch."""
  import jax
  import tensorflow as tf
  tf.config.set_visible_devices([], "GPU")
  from semflow_jax.data import pipeline
  imported, rchar = time.time(), _rchar()
  jax.process_count, jax.process_index = (lambda: processes), (lambda: 0)
  builder = _scenes(workdir, n, legacy)
  if legacy:
    from benchmarks import legacy_pipeline
    batch = next(legacy_pipeline.train_batches(builder, BATCH, seed=0))
  else:
    batch = next(pipeline.TrainIterator(builder, BATCH, seed=0))
  now = time.time()
  assert batch["image"].shape == (BATCH, 32, 32, 3)
  return {"first_batch_s": now - started, "after_imports_s": now - imported,
          "bytes": _rchar() - rchar}


# -- driver --------------------------------------------------------------------------------------

def _child(args_list):
  started = time.time()
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), f"--started={started}",
                         *args_list], cwd=REPO, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "2"})
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  if proc.returncode != 0 or not lines:
    raise RuntimeError(f"{args_list} failed:\n{proc.stderr[-3000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def _mb(n):
  return f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 2**10:.0f} KB"


def startup(workdir):
  for n in SIZES:  # build both formats first (once per workdir), outside the measurements
    for legacy in (False, True):
      _scenes(workdir, n, legacy)
  print("\nStart-up: process start -> first batch (per-process batch 16)\n")
  print("| examples in split | processes | legacy: s to first batch | legacy: bytes read | "
        "random access: s to first batch | random access: bytes read |")
  print("| --- | --- | --- | --- | --- | --- |")
  for n in SIZES:
    for processes in PROCESS_COUNTS:
      row = {}
      for name, legacy in (("legacy", True), ("new", False)):
        row[name] = _child(["--child=startup", f"--workdir={workdir}", f"--n={n}",
                            f"--processes={processes}", f"--legacy={legacy}"])
      print(f"| {n:,} | {processes} | {row['legacy']['first_batch_s']:.1f} "
            f"({row['legacy']['after_imports_s']:.1f} after imports) | "
            f"{_mb(row['legacy']['bytes'])} | {row['new']['first_batch_s']:.1f} "
            f"({row['new']['after_imports_s']:.1f} after imports) | {_mb(row['new']['bytes'])} |",
            flush=True)


# Timed batches of 16 per measurement: a few CPU-seconds each.
THROUGHPUT_BATCHES = {"coco_stuff": 24, "cityscapes_semantic": 12, "celebamask_hq": 150}


def throughput(workdir, repeats):
  import statistics

  from benchmarks import pipeline_throughput as pt
  print(f"\nThroughput: examples per CPU-second, median of {repeats} alternating runs each "
        "(all runs in brackets)\n")
  print("| dataset | output HxW | legacy | random access | ratio of medians |")
  print("| --- | --- | --- | --- | --- |")
  for name in pt.WRITERS:
    runs = {p: [] for p in pt.PIPELINES}
    for _ in range(repeats):
      for pipeline_name in pt.PIPELINES[::-1]:  # legacy first: it also writes the manual tree
        runs[pipeline_name].append(_child([
            "--child=throughput", f"--workdir={workdir}", f"--dataset={name}",
            f"--pipeline={pipeline_name}", f"--batches={THROUGHPUT_BATCHES[name]}"]))
    rates = {p: [r["examples_per_cpu_s"] for r in rs] for p, rs in runs.items()}
    old, new = (statistics.median(rates[p]) for p in ("legacy", "random_access"))
    shown = {p: ", ".join(f"{x:.0f}" if x >= 100 else f"{x:.1f}" for x in rates[p])
             for p in rates}
    output = runs["random_access"][0]["output"]
    print(f"| {name} | {output[0]}x{output[1]} | {old:.1f} ({shown['legacy']}) | {new:.1f} "
          f"({shown['random_access']}) | {new / old:.2f} |", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default=None, help="datasets are written here once")
  parser.add_argument("--part", default="all", choices=("all", "startup", "throughput"))
  parser.add_argument("--repeats", type=int, default=3, help="runs per pipeline (throughput)")
  parser.add_argument("--batches", type=int, default=24, help=argparse.SUPPRESS)
  # Internal: one measurement in a fresh process.
  parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--started", type=float, default=None, help=argparse.SUPPRESS)
  parser.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
  parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
  parser.add_argument("--legacy", default="False", help=argparse.SUPPRESS)
  parser.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--pipeline", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  sys.path.insert(0, REPO)
  if args.child == "startup":
    result = startup_child(args.workdir, args.n, args.processes, args.legacy == "True",
                           args.started)
    print("RESULT " + json.dumps(result), flush=True)
    return
  if args.child == "throughput":
    from benchmarks import pipeline_throughput as pt
    r = pt.measure(args.dataset, args.workdir, 64, args.batches, pipeline_name=args.pipeline)
    r["output"] = [int(x) for x in r["output"]]
    print("RESULT " + json.dumps({k: (float(v) if isinstance(v, float) else v)
                                  for k, v in r.items()}), flush=True)
    return
  workdir = args.workdir or tempfile.mkdtemp(prefix="input_bench_")
  print(f"{time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPU cores, load average "
        f"{os.getloadavg()[0]:.1f}, workdir {workdir}")
  if args.part in ("all", "startup"):
    startup(workdir)
  if args.part in ("all", "throughput"):
    throughput(workdir, args.repeats)
  print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  main()
