"""What a run reports to: clu's metric writer, the one training and --mode=eval write their scalars,
hyperparameters and image grids to."""

import jax
import ml_collections
from clu import metric_writers

from semflow_jax import storage


def for_run(workdir: str, config: ml_collections.ConfigDict) -> metric_writers.MetricWriter:
  """TensorBoard event files in `workdir` (local or gs://) from process 0 when
  `config.train.tensorboard` (default True), else the console only (sweeps, tests, the other
  processes)."""
  enabled = config.train.get("tensorboard", True) and jax.process_index() == 0
  return metric_writers.create_default_writer(storage.resolve(workdir),
                                              just_logging=not enabled)
