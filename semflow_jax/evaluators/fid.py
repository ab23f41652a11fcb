"""FID of syntheses a (quantised to uint8, as the files pytorch-fid reads) against the real
validation images at the model's size, with pytorch-fid's InceptionV3 (`config.eval.fid_weights`,
converted by python -m semflow_jax.convert_eval_nets): `fid`, with a `_<method>_<steps>` suffix
for further synthesis samplers. Without weights it is None with the reason under `skipped`.

The features are computed on the devices from the batch-sharded syntheses; per process, the
sums of the features and of their outer products (`inception.RunningStatistics`) are summed over
processes, and the Frechet distance is taken against the real split's statistics, computed once
per run and cached as an .npz (`config.eval.fid_reference`, default
<workdir>/eval/fid_reference.npz; a cache describing other data is refused; process 0 decides
whether the cache exists, so every process takes the same collective path).
"""

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from semflow_jax import metrics, storage
from semflow_jax.data import pipeline
from semflow_jax.evaluators import common
from semflow_jax.models import inception as inception_lib


class Metric(common.Metric):
  uses = (common.SYNTHESIS,)

  def __init__(self, run):
    super().__init__(run)
    self.features = None
    self._reference = None  # (mu, sigma) of the real split, computed or read once per run
    weights = run.config.eval.get("fid_weights")
    if weights:
      from semflow_jax import perceptual
      from semflow_jax.weights import load_inception
      self.features = perceptual.InceptionFeatures(load_inception(weights),
                                                   run.mesh)
    else:
      self.skipped.update({n: "config.eval.fid_weights is not set (convert pytorch-fid's "
                              "weights with python -m semflow_jax.convert_eval_nets; README)"
                           for n in self.names()})

  def names(self):
    return [f"fid{s}" for s in self.run.suffixes]

  def network_evaluations(self):
    return common.synthesis_network_evaluations(self.run, ["fid"])

  def reset(self):
    self._running = {s: inception_lib.RunningStatistics() for s in self.run.suffixes}

  def device(self, params, batch, shared):
    if self.features is None:
      return {}
    return {s: self.features.device(shared[common.synthesis_key("a_uint8", s)])
            for s in self.run.suffixes}

  def update(self, batch, own):
    for s in own:
      self._running[s].update(own[s][batch.mask])

  def result(self, workdir):
    out = dict.fromkeys(self.names())
    if self.features is None:
      return out
    reference = self.reference(workdir)
    for s, running in self._running.items():
      count = int(common.sum_over_processes(np.array([running.count]))[0])
      if count < 2:  # a covariance needs two images
        continue
      total = inception_lib.RunningStatistics(running.dim)
      total.count = count
      total.sum = common.sum_over_processes(running.sum)
      total.outer = common.sum_over_processes(running.outer)
      out[f"fid{s}"] = metrics.frechet_distance(*total.result(), *reference)
    return out

  def reference(self, workdir):
    """(mu, sigma) of the real validation images as the model sees them (resized whole to its
    input), computed once per run and cached as an .npz: `config.eval.fid_reference`, or
    eval/fid_reference.npz in the workdir (refused if it describes other data)."""
    if self._reference is None:
      from semflow_jax import perceptual
      run = self.run
      description = {"dataset": run.builder.info.full_name, "split": "validation",  # pyright: ignore[reportAttributeAccessIssue]
                     "num_examples": run.num_examples, "image_size": list(run.model.image_size)}
      cache = run.config.eval.get("fid_reference") or (
          storage.join(workdir, "eval", "fid_reference.npz") if workdir else None)
      # Every process takes the same branch (computing is collective): process 0 decides.
      cached = bool(cache) and bool(multihost_utils.broadcast_one_to_all(
          np.asarray(storage.exists(cache))))
      if cached:
        logging.info("FID reference statistics from %s", cache)
        self._reference = perceptual.read_statistics(cache, description)
      else:
        batches = pipeline.eval_batches(run.builder, "validation",
                                        run.batch_size // jax.process_count(),
                                        run.num_examples, ("image",), run.preprocess)
        mu, sigma, count = perceptual.statistics_of(batches, self.features, log_every_s=10.0,
                                                    what="the reference split",
                                                    between_batches=run.check_stop)
        if cache and jax.process_index() == 0:
          perceptual.write_statistics(cache, mu, sigma, count, description)
          logging.info("wrote FID reference statistics of %d images to %s", count, cache)
        self._reference = (mu, sigma)
    return self._reference
