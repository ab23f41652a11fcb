"""Restart-to-first-step time with an empty and a warm compilation cache, and the time from a
finished run's last output to its exit.

  python benchmarks/restart.py                                   # default + tiny SD configs
  python benchmarks/restart.py --configs=configs/synthetic.py --steps=4

For each config: a first run writes a checkpoint at step `--steps` (cache off), then the same
command is restarted twice with `--config.train.num_steps` one step further: once with an
empty compilation cache directory, once with the cache the first restart filled. Each time is
from the process's start to the log line of its first training step (what a preempted run
costs before it trains again). The exit figure is the last restart's: from the newest file it
wrote in the workdir (its final evaluation's metrics) to the process's exit. Every run is the
real command line (`python -m semflow_jax.main`), one process on this machine's devices.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIRST_STEP = re.compile(r"step (\d+)/(\d+)\s+loss")


def _run(config, workdir, steps, cache, tfds_dir):
  """(seconds to the first step's log line, seconds from the last output to exit, log)."""
  cmd = [sys.executable, "-m", "semflow_jax.main", f"--config={config}", f"--workdir={workdir}",
         f"--config.train.num_steps={steps}", f"--config.train.checkpoint_every={steps}",
         "--config.train.log_every=1", "--config.train.eval_every=0",
         f"--config.compilation_cache={cache}"]
  if tfds_dir:
    cmd.append(f"--config.data.tfds_data_dir={tfds_dir}")
  start = time.time()
  proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  first, lines = None, []
  for line in proc.stderr:
    lines.append(line)
    if first is None and FIRST_STEP.search(line):
      first = time.time() - start
  proc.wait()
  ended = time.time()
  if proc.returncode != 0:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{''.join(lines[-40:])}")
  newest = max(os.path.getmtime(os.path.join(d, f)) for d, _, files in os.walk(workdir)
               for f in files if "compilation_cache" not in d)
  return first, ended - newest, "".join(lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--configs", default="configs/synthetic.py,configs/sd15.py:tiny")
  parser.add_argument("--steps", type=int, default=2)
  parser.add_argument("--tfds_data_dir", default=None)
  args = parser.parse_args()
  print(f"load before: {open('/proc/loadavg').read().strip()}")
  for config in args.configs.split(","):
    with tempfile.TemporaryDirectory(prefix="semflow_restart_") as tmp:
      workdir, cache = os.path.join(tmp, "run"), os.path.join(tmp, "cache")
      _run(config, workdir, args.steps, "off", args.tfds_data_dir)
      empty, _, _ = _run(config, workdir, args.steps + 1, cache, args.tfds_data_dir)
      warm, exit_s, log = _run(config, workdir, args.steps + 2, cache, args.tfds_data_dir)
      hits = re.findall(r"compilation cache: (\d+ hits, \d+ misses)", log)
      print(f"{config}: restart to first step {empty:.1f} s (empty cache), {warm:.1f} s "
            f"(warm cache{'; ' + hits[-1] if hits else ''}); last output to exit {exit_s:.1f} s")
  print(f"load after: {open('/proc/loadavg').read().strip()}")


if __name__ == "__main__":
  main()
