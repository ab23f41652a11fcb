"""What a run reports to: clu's metric writer, the one training and --mode=eval write their scalars,
hyperparameters and image grids to."""

import os
import shutil
import tempfile

import jax
import ml_collections
from clu import metric_writers

from semflow_jax import storage


def for_run(workdir: str, config: ml_collections.ConfigDict) -> metric_writers.MetricWriter:
  """TensorBoard event files in `workdir` (local or gs://) from process 0 when
  `config.train.tensorboard` (default True), else the console only (sweeps, tests, the other
  processes).

  Event files are written by TensorFlow's own file system. Where `epath` does not use it
  (`EPATH_USE_TF=false`: files go through fsspec, e.g. to a GCS emulator that TensorFlow's
  client cannot reach) a bucket workdir's events are written to a local directory and uploaded
  through `storage` after every write (each upload replaces the object whole).
  """
  enabled = config.train.get("tensorboard", True) and jax.process_index() == 0
  if not (enabled and storage.is_url(workdir) and os.environ.get("EPATH_USE_TF", "").lower()
          in ("false", "0", "no")):
    return metric_writers.create_default_writer(storage.resolve(workdir),
                                                just_logging=not enabled)
  local = tempfile.mkdtemp(prefix="semflow_events_")
  return _UploadedEvents(metric_writers.create_default_writer(local), local,
                         storage.resolve(workdir))  # pyright: ignore[reportReturnType]


class _UploadedEvents:
  """A metric writer whose event files (written to `local`) are copied to `target` after each
  write, at `flush` and at `close` (which also removes `local`)."""

  def __init__(self, writer, local: str, target: str):
    self._writer, self._local, self._target = writer, local, target

  def __getattr__(self, name):
    method = getattr(self._writer, name)
    if not name.startswith("write_"):
      return method

    def write_and_upload(*args, **kwargs):
      result = method(*args, **kwargs)
      self.flush()
      return result
    return write_and_upload

  def _upload(self) -> None:
    for name in os.listdir(self._local):
      with open(os.path.join(self._local, name), "rb") as f:
        storage.write_bytes(storage.join(self._target, name), f.read())

  def flush(self) -> None:
    self._writer.flush()
    self._upload()

  def close(self) -> None:
    self._writer.close()
    self._upload()
    shutil.rmtree(self._local, ignore_errors=True)
