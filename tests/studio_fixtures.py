"""Shared by the studio's tests: one tiny checkpoint per session, one studio server per module.

The checkpoint is the tiny synthetic config trained for its 6 steps (seconds), so the page runs
on a real trained model; `serve` starts the page in this process (Gradio's own tests do the
same: launch with prevent_thread_lock, a gradio_client.Client on the local URL, close both).
"""

import contextlib
import os

from tests.conftest import free_port

_TRAINED = {}


def tiny_config(tfds_dir: str):
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.data.tfds_data_dir = tfds_dir
  return config


def trained_workdir(tmp_path_factory, tfds_dir: str) -> str:
  """A workdir holding the tiny config's checkpoint, trained once per test session."""
  if tfds_dir not in _TRAINED:
    from semflow_jax import train
    config = tiny_config(tfds_dir)
    config.train.tensorboard = False
    # The evaluation at the end of training is not what these tests are about: keep it small.
    config.eval.seg_steps = (1,)
    config.eval.synth_steps = 1
    config.eval.colour_only = False
    config.eval.num_examples = 8
    workdir = str(tmp_path_factory.mktemp("studio_run"))
    train.train_and_evaluate(config, workdir)
    _TRAINED[tfds_dir] = workdir
  return _TRAINED[tfds_dir]


@contextlib.contextmanager
def serve(studio, **launch_kwargs):
  """The studio's page on a free local port: yields its URL; closes the server afterwards."""
  from semflow_jax.studio import app as studio_app
  demo, url = studio_app.launch(studio, port=free_port(), block=False, **launch_kwargs)
  try:
    yield url
  finally:
    demo.close()


def write_png(path, array) -> str:
  from PIL import Image
  Image.fromarray(array).save(path)
  return str(path)


def read_png(path):
  """A result file: it must be a PNG (the studio never sends lossy images); as a numpy array."""
  import numpy as np
  from PIL import Image
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{os.path.basename(path)} is not a PNG"
  with Image.open(path) as image:
    return np.asarray(image)
