"""Segmenting files: a folder in one process against one process per file, and where the time
of one single-file call goes.

  python benchmarks/segment_files.py                        # 100 images at 32x32
  python benchmarks/segment_files.py --num_images=20 --workdir=runs/synthetic

Both sides run the real command line (`python -m semflow_jax.main --mode=segment`) on the same
`--num_images` random 32x32 PNGs with the default config (configs/synthetic.py): one process
with `--input=<folder>`, then one process per image with `--input=<file>`, one after the
other, as a shell loop would run them. Without --workdir a checkpoint of the default config
with random weights is written to a temporary directory (speed does not depend on the weights).
Each side starts with an empty compilation cache (XDG_CACHE_HOME), as a first use would: the
folder run compiles once, the first single-file call compiles and the later ones load the
program from the cache.

Then the phases of one single-file call (cache warm), timed inside a process that does what
`segment_file` does, step by step: interpreter start-up, imports, JAX's start, the checkpoint
(the model's shapes traced, Orbax's metadata and the restore), the segment program (traced and
fetched from the cache, or compiled), the model run alone (a second call), the PNGs written.

Prints one JSON object: images per second for each side, their ratio, and the phases (s).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = "configs/synthetic.py"


def _write_checkpoint(workdir: str) -> None:
  """A checkpoint of the default config at step 0 with random weights (as training writes)."""
  code = f"""
from configs import synthetic
from semflow_jax import checkpoint, parallel, runtime, state
runtime.configure_process()
from semflow_jax.semflow import SemFlow
config = synthetic.get_config()
mesh = parallel.make_mesh(config)
model = SemFlow.from_config(config, mesh)
train_state = state.create(model, state.make_optimizer(config), config, mesh)
manager = checkpoint.make_manager({workdir!r}, 1, async_save=False)
checkpoint.save(manager, 0, train_state, {{"position": 0}}, model.checkpoint_record())
manager.wait_until_finished()
"""
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, env=_env())


def _write_images(folder: str, count: int, size: int = 32) -> list:
  import numpy as np
  from PIL import Image
  rng = np.random.default_rng(0)
  os.makedirs(folder, exist_ok=True)
  paths = []
  for i in range(count):
    path = os.path.join(folder, f"image_{i:03d}.png")
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    paths.append(path)
  return paths


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  return {**env, **extra}


def _segment(workdir, input_path, output, cache):
  subprocess.run([sys.executable, "-m", "semflow_jax.main", f"--config={CONFIG}",
                  f"--workdir={workdir}", "--mode=segment", f"--input={input_path}",
                  f"--output={output}"], cwd=REPO, check=True, env=_env(XDG_CACHE_HOME=cache),
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- the phases of one call, measured inside the process ----------------------------------------
def _phases(workdir: str, image_path: str, output: str, started: float) -> dict:
  marks = [("interpreter start-up", time.time() - started)]
  last = time.perf_counter()

  def mark(name):
    nonlocal last
    now = time.perf_counter()
    marks.append((name, now - last))
    last = now

  import jax
  import numpy as np
  from semflow_jax import image_files, images, main, runtime, sample, storage  # noqa: F401  (what main.py imports)
  from configs import synthetic
  mark("imports (jax, flax, orbax, semflow_jax)")
  config = synthetic.get_config()
  runtime.configure_process(config, None)  # as main.py does for sampling
  jax.devices()
  mark("JAX start (CPU backend)")
  image = image_files.read_image(image_path)
  predictor = sample.Predictor.load(config, workdir)
  jax.block_until_ready(predictor.params)
  mark("checkpoint: model shapes, metadata, restore")
  labels = predictor.segment(image)
  mark("segment program: trace + cache load (or compile) + run")
  again = predictor.segment(image)
  mark("the model alone (a second call)")
  assert np.array_equal(labels, again)
  images.write_png(output, labels)
  preview = storage.join(storage.parent(output), "mask_preview.png")
  classes = predictor.classes
  images.write_png(preview, images.preview_with_legend(labels, classes.names, classes.colours))
  mark("label map and preview PNGs written")
  return dict(marks)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_images", type=int, default=100)
  parser.add_argument("--workdir", default=None, help="a run of configs/synthetic.py (default: "
                      "random weights in a temporary directory)")
  parser.add_argument("--phases_only", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--image", help=argparse.SUPPRESS)
  parser.add_argument("--output", help=argparse.SUPPRESS)
  parser.add_argument("--started", type=float, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.phases_only:
    print(json.dumps(_phases(args.workdir, args.image, args.output, args.started)))
    return

  tmp = tempfile.mkdtemp(prefix="segment_files_")
  workdir = args.workdir or os.path.join(tmp, "run")
  if not args.workdir:
    _write_checkpoint(workdir)
  paths = _write_images(os.path.join(tmp, "images"), args.num_images)

  start = time.perf_counter()
  _segment(workdir, os.path.join(tmp, "images"), os.path.join(tmp, "folder_out"),
           os.path.join(tmp, "cache_folder"))
  folder_s = time.perf_counter() - start
  assert len(os.listdir(os.path.join(tmp, "folder_out", "labels"))) == args.num_images

  cache = os.path.join(tmp, "cache_files")
  calls = []
  for i, path in enumerate(paths):
    start = time.perf_counter()
    _segment(workdir, path, os.path.join(tmp, "files_out", f"{i:03d}.png"), cache)
    calls.append(time.perf_counter() - start)
  files_s = sum(calls)

  started = time.time()
  proc = subprocess.run(
      [sys.executable, os.path.abspath(__file__), "--phases_only", f"--workdir={workdir}",
       f"--image={paths[0]}", f"--output={os.path.join(tmp, 'phases', 'mask.png')}",
       f"--started={started}"], cwd=REPO, env=_env(XDG_CACHE_HOME=cache), check=True,
      capture_output=True, text=True)
  whole = time.time() - started
  phases = json.loads(proc.stdout.strip().splitlines()[-1])
  phases = {k: round(v, 3) for k, v in phases.items()}
  phases["exit (the rest)"] = round(whole - sum(phases.values()), 3)

  print(json.dumps({
      "num_images": args.num_images, "image_size": "32x32", "config": CONFIG,
      "folder_one_process": {"seconds": round(folder_s, 2),
                             "images_per_s": round(args.num_images / folder_s, 2)},
      "one_process_per_file": {"seconds": round(files_s, 2),
                               "images_per_s": round(args.num_images / files_s, 2),
                               "first_call_s": round(calls[0], 2),
                               "median_call_s": round(sorted(calls)[len(calls) // 2], 2)},
      "speedup": round(files_s / folder_s, 1),
      "one_call_phases_s": phases, "one_call_total_s": round(whole, 2),
      "load": open("/proc/loadavg").read().split()[:3] if os.path.exists("/proc/loadavg")
      else None,
  }, indent=2))


if __name__ == "__main__":
  main()
