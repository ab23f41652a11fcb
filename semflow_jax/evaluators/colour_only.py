"""What colour alone gets: a per-pixel Gaussian colour classifier (`metrics.ColourClassifier`)
fitted once per run on the first `config.eval.colour_fit_examples` training images, scored
against the labels at the model's size on the real validation images (`colour_only_miou`) and
on syntheses a (`colour_only_miou_synth`, with a `_<method>_<steps>` suffix for further
synthesis samplers). The floor a segmenter must beat to show it uses shape, and a realism check
for synthesised colours. `config.eval.colour_only=False` turns it off (the real datasets: it
costs host time and means little there).
"""

from absl import logging

from semflow_jax import metrics
from semflow_jax.data import pipeline
from semflow_jax.evaluators import common


class Metric(common.Confusions):
  uses = (common.SYNTHESIS,)

  def __init__(self, run):
    super().__init__(run)
    self.classifier = None
    if not run.config.eval.get("colour_only", True):
      for name in self.names():
        self.skipped[name] = "config.eval.colour_only is False"

  def names(self):
    return ["colour_only_miou"] + [f"colour_only_miou_synth{s}" for s in self.run.suffixes]

  def network_evaluations(self):
    return common.synthesis_network_evaluations(self.run, ["colour_only_miou_synth"])

  def reset(self):
    super().reset()
    if self.classifier is None and self._confusion:  # fitted at the first evaluation only
      run = self.run
      logging.info("fitting the colour-only classifier on %d training images",
                   run.config.eval.colour_fit_examples)
      train = pipeline.load_arrays(run.builder, "train", run.config.eval.colour_fit_examples,
                                   preprocess=run.preprocess)
      self.classifier = metrics.ColourClassifier.fit(train["image"], train["label"],
                                                     run.model.num_classes)

  def confusions(self, batch, own):
    if not self._confusion:
      return {}
    c = self.run.model.num_classes
    out = {"colour_only_miou": metrics.confusion_matrix(
        batch.label, self.classifier.predict(batch.data["image"]), c, batch.mask)}
    for s in self.run.suffixes:
      synthesis = batch.shared[common.synthesis_key("a_uint8", s)]
      out[f"colour_only_miou_synth{s}"] = metrics.confusion_matrix(
          batch.label, self.classifier.predict(synthesis), c, batch.mask)
    return out
