"""The round trip: each synthesis a, quantised to uint8 as a saved image would be, segmented
with ONE Euler step, against the mask it was synthesised from, at the model's size:
`roundtrip_miou` (with a `_<method>_<steps>` suffix for further synthesis samplers). One step,
so it measures the images, not how reversible the ODE is.
"""

from semflow_jax import metrics
from semflow_jax.evaluators import common

SAMPLER = ("euler", 1)


class Metric(common.Confusions):
  uses = (common.SYNTHESIS,)

  def names(self):
    return [f"roundtrip_miou{s}" for s in self.run.suffixes]

  def network_evaluations(self):
    return common.synthesis_network_evaluations(self.run, ["roundtrip_miou"], extra=SAMPLER)

  def device(self, params, batch, shared):
    # The quantised syntheses have the sharding of a real image batch, so this is the one-step
    # segmentation program that real images use (one executable for both).
    segment = self.run.programs.segment(SAMPLER[1], SAMPLER[0])
    return {s: segment(params, shared[common.synthesis_key("a_uint8", s)])
            for s in self.run.suffixes}

  def confusions(self, batch, own):
    return {f"roundtrip_miou{s}": metrics.confusion_matrix(
        batch.label, own[s], self.run.model.num_classes, batch.mask) for s in self.run.suffixes}
