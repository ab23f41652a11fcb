"""LPIPS (AlexNet, v0.1; `config.eval.lpips_weights`, converted by python -m
semflow_jax.convert_eval_nets) on the quantised syntheses, on the devices:
`lpips_diversity` (SemFlow's diversity: LPIPS between the two syntheses a and b of each mask)
and `lpips_to_real` (SymmFlow's: LPIPS between synthesis a and the real image), each with a
`_<method>_<steps>` suffix for further synthesis samplers. Without weights, or for images below
AlexNet's 32x32, they are None with the reason under `skipped`.
"""

from semflow_jax.evaluators import common

NAMES = ("lpips_diversity", "lpips_to_real")


class Metric(common.PerExample):
  uses = (common.SYNTHESIS,)

  def __init__(self, run):
    super().__init__(run)
    self.distances = None
    weights = run.config.eval.get("lpips_weights")
    if not weights:
      reason = ("config.eval.lpips_weights is not set (convert the AlexNet and v0.1 head "
                "weights with python -m semflow_jax.convert_eval_nets; README)")
    elif min(run.model.image_size) < 32:
      reason = f"LPIPS' AlexNet needs images of at least 32x32, not {run.model.image_size}"
    else:
      from semflow_jax import perceptual
      from semflow_jax.weights import load_lpips
      self.distances = perceptual.LpipsDistances(load_lpips(weights), run.mesh)
      reason = None
    if reason:
      self.skipped.update({n: reason for n in self.names()})

  def names(self):
    return [f"{n}{s}" for s in self.run.suffixes for n in NAMES]

  def network_evaluations(self):
    return common.synthesis_network_evaluations(self.run, NAMES)

  def device(self, params, batch, shared):
    if self.distances is None:
      return {}
    out = {}
    for s in self.run.suffixes:
      a = shared[common.synthesis_key("a_uint8", s)]
      out[f"lpips_diversity{s}"] = self.distances.device(
          a, shared[common.synthesis_key("b_uint8", s)])
      out[f"lpips_to_real{s}"] = self.distances.device(a, batch["image"])
    return out

  def values(self, batch, own):
    return {name: own[name][batch.mask] for name in own}
