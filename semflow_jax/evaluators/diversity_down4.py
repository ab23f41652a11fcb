"""Diversity at the scale of objects: `diversity_down4` is the mean |a - b| between the two
syntheses of each mask after 4x4 average pooling of both ([-1, 1] units; a `_<method>_<steps>`
suffix for further synthesis samplers), so independent pixel noise, which raises `diversity`,
averages out here. `diversity_real_down4`: the same between the two real renderings (image,
image_alt) where the dataset has them.
"""

from semflow_jax import anchors, metrics
from semflow_jax.evaluators import common

FACTOR = 4


class Metric(common.PerExample):
  uses = (common.SYNTHESIS,)

  def __init__(self, run):
    super().__init__(run)
    if not run.has_alt:
      self.skipped["diversity_real_down4"] = ("the dataset has one rendering per mask (no "
                                              "image_alt)")

  def names(self):
    return [f"diversity_down4{s}" for s in self.run.suffixes] + ["diversity_real_down4"]

  def network_evaluations(self):
    return common.synthesis_network_evaluations(self.run, ["diversity_down4"])

  def values(self, batch, own):
    m, shared = batch.mask, batch.shared
    out = {f"diversity_down4{s}": metrics.per_example_downsampled_difference(
        shared[common.synthesis_key("a", s)][m], shared[common.synthesis_key("b", s)][m], FACTOR)
           for s in self.run.suffixes}
    if self.run.has_alt:
      out["diversity_real_down4"] = metrics.per_example_downsampled_difference(
          anchors.to_unit_range(batch.data["image"][m]),
          anchors.to_unit_range(batch.data["image_alt"][m]), FACTOR)
    return out
