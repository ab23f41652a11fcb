"""How noisy or sharp images are: the high-frequency energy hf(x), the mean over pixels and
channels of (x - box3(x))^2 for x in [-1, 1], box3 the 3x3 mean with edges replicated
(metrics.high_frequency_energy). `hf_energy_synth`: the mean of hf over syntheses a (a
`_<method>_<steps>` suffix for further synthesis samplers); `hf_energy_real`: over the real
validation images at the model's size. Syntheses far above the real images are noisy, far below
blurry.
"""

import numpy as np

from semflow_jax import anchors, metrics
from semflow_jax.evaluators import common


class Metric(common.Metric):
  uses = (common.SYNTHESIS,)

  def names(self):
    return [f"hf_energy_synth{s}" for s in self.run.suffixes] + ["hf_energy_real"]

  def network_evaluations(self):
    return common.synthesis_network_evaluations(self.run, ["hf_energy_synth"])

  def reset(self):
    self._sums = np.zeros(len(self.names()))

  def update(self, batch, own):
    m = batch.mask
    images = [batch.shared[common.synthesis_key("a", s)][m] for s in self.run.suffixes]
    images.append(anchors.to_unit_range(batch.data["image"][m]))
    self._sums += [metrics.high_frequency_energy(x).sum() for x in images]

  def result(self, workdir):
    sums = common.sum_over_processes(self._sums)
    return {n: float(v / self.run.num_examples) for n, v in zip(self.names(), sums)}
