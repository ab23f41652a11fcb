"""Diversity at the scale of objects: `diversity_down4` is the mean |a - b| between the two
syntheses of each mask after 4x4 average pooling of both ([-1, 1] units; a `_<method>_<steps>`
suffix for further synthesis samplers), so independent pixel noise, which raises `diversity`,
averages out here. `diversity_real_down4`: the same between the two real renderings (image,
image_alt) where the dataset has them.
"""

from semflow_jax import metrics
from semflow_jax.evaluators import diversity

FACTOR = 4


class Metric(diversity.Metric):
  NAME, REAL_NAME = "diversity_down4", "diversity_real_down4"

  @staticmethod
  def difference(a, b):
    return metrics.per_example_downsampled_difference(a, b, FACTOR)
