"""launch/rehearse.sh --short, as a user runs it: the whole pod chain against a local bucket."""

import os
import subprocess
import sys

from tests.conftest import REPO


def test_the_dress_rehearsal_runs_the_chain_end_to_end(tmp_path):
  """The short form (6 steps, no reference run): convert, build and encode into the bucket,
  train on 2 processes from the cached latents, SIGTERM to one, resume on 1, the final
  evaluation and a folder segmentation read from the bucket, and the bucket listed."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # it sets each process's
  proc = subprocess.run(["bash", "launch/rehearse.sh", f"--dir={tmp_path}", "--short"],
                        cwd=REPO, env={**env, "PYTHON": sys.executable}, capture_output=True,
                        text=True, timeout=1800)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = proc.stdout
  for stage in ("folder", "convert", "build", "encode", "train", "resume", "evaluation",
                "segment"):
    assert f"== {stage}: " in out, stage
  assert "SIGTERM to process 1 after step 3 was logged" in out
  assert "all 2 processes saved step" in out
  assert "on 1 processes x 2 devices, trained to 6, evaluated" in out
  assert "segment: 8 of 8 images written" in out
  listing = out.split("== gs://semflow-rehearsal: ")[1]
  for name in ("sd15/conversion.json", "run/checkpoints/6/", "run/events.out.tfevents.",
               "run/eval/metrics_6.json", "/latents.json", "tfds/folder_dataset/",
               "segmented/labels/"):
    assert name in listing, (name, listing)
  assert "== stage times (s): " in out
