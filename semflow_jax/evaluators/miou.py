"""Segmentation mIoU per sampler, as the literature scores it: `miou_<method>_<steps>` and
`per_class_iou_<method>_<steps>` for every sampler of `config.eval.seg_methods` x
`config.eval.seg_steps`.

Every image is resized whole to the model's input (no crop), segmented by integrating t 0 -> 1,
and the prediction is resized back to its label's native size with nearest neighbour and scored
there: one confusion matrix over the split (ignore label 255 left out, padded examples masked
out, summed exactly over processes), IoU per class named by the dataset's classes, mIoU over the
classes present in truth or prediction (metrics.py; equal to Cityscapes' official pixel-level
evaluation, tested). A class with no IoU is None, never NaN. The main sampler's per-class IoU
also goes to TensorBoard (`eval/per_class_iou_<method>_<steps>/<class>`).
"""

from semflow_jax import flow, metrics
from semflow_jax.data import pipeline
from semflow_jax.evaluators import common


def _name(sampler) -> str:
  return f"miou_{sampler[0]}_{sampler[1]}"


class Metric(common.Confusions):
  uses = (common.SEGMENTATION, common.NATIVE_LABELS)

  def names(self):
    return [_name(s) for s in self.run.seg_samplers]

  def network_evaluations(self):
    return {_name(s): flow.network_evaluations(s[1], s[0]) for s in self.run.seg_samplers}

  def confusions(self, batch, own):
    return {_name(s): metrics.native_confusion(
        batch.shared[common.segmentation_key(s)], batch.data[pipeline.NATIVE_LABEL_KEY],
        batch.data[pipeline.NATIVE_SIZE_KEY], self.run.model.num_classes, batch.mask)
            for s in self.run.seg_samplers}

  def result(self, workdir):
    out = {}
    for s, confusion in zip(self.run.seg_samplers, self.summed().values()):
      scores = metrics.iou_from_confusion(confusion)
      out[_name(s)] = scores["miou"]
      out[f"per_class_iou_{s[0]}_{s[1]}"] = dict(zip(self.run.class_names,
                                                     scores["per_class_iou"]))
    return out

  def tensorboard(self, result):
    m, n = self.run.main_seg_sampler
    scalars = {}
    for name, value in result[f"per_class_iou_{m}_{n}"].items():
      if value is not None:
        tag = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        scalars[f"eval/per_class_iou_{m}_{n}/{tag}"] = value
    return scalars
