"""Diversity: the mean |a - b| over pixels between the two syntheses of each mask (different
perturbation noise), in [-1, 1] units: `diversity` (with a `_<method>_<steps>` suffix for
further synthesis samplers). `diversity_real`: the same between the dataset's two real
renderings of each mask (image, image_alt), where it has them: the yardstick.
"""

from semflow_jax import anchors, metrics
from semflow_jax.evaluators import common


class Metric(common.PerExample):
  uses = (common.SYNTHESIS,)
  NAME, REAL_NAME = "diversity", "diversity_real"

  def __init__(self, run):
    super().__init__(run)
    if not run.has_alt:
      self.skipped[self.REAL_NAME] = "the dataset has one rendering per mask (no image_alt)"

  @staticmethod
  def difference(a, b):
    """(N,) per-example difference of two image batches in [-1, 1]."""
    return metrics.per_example_mean_abs_difference(a, b)

  def names(self):
    return [f"{self.NAME}{s}" for s in self.run.suffixes] + [self.REAL_NAME]

  def network_evaluations(self):
    return common.synthesis_network_evaluations(self.run, [self.NAME])

  def values(self, batch, own):
    m, shared = batch.mask, batch.shared
    out = {f"{self.NAME}{s}": self.difference(shared[common.synthesis_key("a", s)][m],
                                              shared[common.synthesis_key("b", s)][m])
           for s in self.run.suffixes}
    if self.run.has_alt:
      out[self.REAL_NAME] = self.difference(anchors.to_unit_range(batch.data["image"][m]),
                                            anchors.to_unit_range(batch.data["image_alt"][m]))
    return out
