"""Evaluation on the validation split: mIoU of segmentation, round trip, diversity, colour realism.

- miou_<method>_<n>: segment real images with n steps (t 0 -> 1), mIoU against the truth.
- roundtrip_miou: synthesise from the true mask (t 1 -> 0, eval.synth_steps), segment the result
  with ONE step, mIoU against the input mask (one step, so it measures the images, not how
  reversible the ODE is).
- diversity: mean |x_a - x_b| in [-1, 1] units between two syntheses of one mask with different
  perturbation noise; diversity_real: the same between two real renderings of one mask, where the
  dataset has them (`image_alt`).
- colour_only_miou(_synth): a per-pixel Gaussian colour classifier fitted on training pixels,
  scored on real and on synthesised images.
"""

import functools
import json
import os
import time

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers
from jax.experimental import multihost_utils

from semflow_jax import anchors, images, metrics, parallel, state
from semflow_jax.data import pipeline
from semflow_jax.semflow import SemFlow


def _host(x):
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def run(model: SemFlow, params, builder, config: ml_collections.ConfigDict, mesh, step: int,
        workdir: str, writer) -> dict:
  """Evaluate `params`; write eval/metrics_<step>.json, samples/ grids and TensorBoard."""
  e = config.eval
  start = time.time()
  n_dev = mesh.devices.size
  batch_size = -(-e.batch_size // n_dev) * n_dev  # round up to a multiple of the devices
  has_alt = "image_alt" in builder.info.features
  keys = ("image", "label", "image_alt") if has_alt else ("image", "label")
  per_process = batch_size // jax.process_count()

  segment = {n: jax.jit(functools.partial(model.segment, steps=n, method=e.method))
             for n in sorted(set(e.seg_steps) | {1})}
  synthesize = jax.jit(functools.partial(model.synthesize, steps=e.synth_steps, method=e.method))
  quantise = jax.jit(anchors.from_unit_range)

  preprocess = pipeline.Preprocess.from_config(config.data)
  train = pipeline.load_arrays(builder, "train", e.colour_fit_examples, preprocess=preprocess)
  colour = metrics.ColourClassifier.fit(train["image"], train["label"], model.num_classes)

  c = model.num_classes
  confusion = {n: np.zeros((c, c), np.int64) for n in segment}
  roundtrip = np.zeros((c, c), np.int64)
  colour_real = np.zeros((c, c), np.int64)
  colour_synth = np.zeros((c, c), np.int64)
  diversity, diversity_real, count = 0.0, 0.0, 0
  shown = None
  base_rng = jax.random.PRNGKey(config.seed + 1)

  batches = pipeline.eval_batches(builder, "validation", per_process, e.num_examples, keys,
                                  preprocess)
  for i, local in enumerate(batches):
    batch = parallel.to_global(local, mesh)
    mask = _host(batch["mask"])
    labels = _host(batch["label"])[..., 0]
    predictions = {n: _host(fn(params, batch["image"])) for n, fn in segment.items()}
    rng_a, rng_b = jax.random.split(jax.random.fold_in(base_rng, i))
    synth_a = synthesize(params, batch["label"], rng_a)
    synth_b = _host(synthesize(params, batch["label"], rng_b))
    # Round trip through uint8, as a synthesised image saved to disk would be.
    synth_a_uint8 = quantise(synth_a)
    synth_rt = _host(segment[1](params, synth_a_uint8))
    synth_a, synth_a_uint8 = _host(synth_a), _host(synth_a_uint8)
    real = _host(batch["image"])
    alt = _host(batch["image_alt"]) if has_alt else None

    for n in segment:
      confusion[n] += metrics.confusion_matrix(labels, predictions[n], c, mask)
    roundtrip += metrics.confusion_matrix(labels, synth_rt, c, mask)
    colour_real += metrics.confusion_matrix(labels, colour.predict(real), c, mask)
    colour_synth += metrics.confusion_matrix(labels, colour.predict(synth_a_uint8), c, mask)
    k = int(mask.sum())
    diversity += metrics.mean_abs_difference(synth_a, synth_b, mask) * k
    if has_alt:
      diversity_real += metrics.mean_abs_difference(real / 127.5 - 1, alt / 127.5 - 1, mask) * k
    count += k
    if shown is None:
      # The synthesis grid starts with the perturbed anchor image synth_a started from (the
      # model's palette and perturbation, as the model sees them).
      starts = _host(quantise(model.perturbed_anchors(batch["label"], rng_a)))
      shown = dict(image=real, label=labels, seg=predictions[max(segment)], synth_a=synth_a_uint8,
                   synth_b=np.asarray(anchors.from_unit_range(synth_b)), alt=alt, anchors=starts)

  method = e.method
  result = {"step": int(step)}
  for n in sorted(segment):
    if n in e.seg_steps:
      result[f"miou_{method}_{n}"] = metrics.mean_iou(confusion[n])
  result.update({
      "roundtrip_miou": metrics.mean_iou(roundtrip),
      "diversity": diversity / count,
      "diversity_real": diversity_real / count if has_alt else None,  # JSON null
      "colour_only_miou": metrics.mean_iou(colour_real),
      "colour_only_miou_synth": metrics.mean_iou(colour_synth),
      "num_examples": count,
      f"per_class_iou_{method}_{max(e.seg_steps)}":
          [round(float(v), 4) for v in metrics.per_class_iou(confusion[max(e.seg_steps)])],
      "eval_seconds": time.time() - start,
  })
  logging.info("eval at step %d: %s", step, json.dumps(result))
  if jax.process_index() == 0:
    _write(result, shown, config, step, workdir, writer)
  return result


def _write(result, shown, config, step, workdir, writer):
  os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
  path = os.path.join(workdir, "eval", f"metrics_{step}.json")
  with open(path + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(path + ".tmp", path)
  writer.write_scalars(step, {f"eval/{k}": v for k, v in result.items()
                              if isinstance(v, (int, float)) and k != "step"})
  n = config.eval.num_sample_images
  s = {k: (v[:n] if v is not None else None) for k, v in shown.items()}
  seg_grid = images.grid([s["image"], images.colourise(s["label"]), images.colourise(s["seg"])])
  synth_cols = [s["anchors"], s["synth_a"], s["synth_b"], s["image"]]
  if s["alt"] is not None:
    synth_cols.append(s["alt"])
  synth_grid = images.grid(synth_cols)
  images.write_png(os.path.join(workdir, "samples", f"segmentation_{step}.png"), seg_grid)
  images.write_png(os.path.join(workdir, "samples", f"synthesis_{step}.png"), synth_grid)
  writer.write_images(step, {"eval/segmentation": seg_grid[None],
                             "eval/synthesis": synth_grid[None]})
  writer.flush()


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=eval: evaluate the latest checkpoint in `workdir`."""
  mesh = parallel.make_mesh(config)
  model = SemFlow.from_config(config)
  params, step = state.load_params(config, workdir, mesh)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  builder = pipeline.get_builder(config.data)
  result = run(model, params, builder, config, mesh, step, workdir, writer)
  writer.close()
  return result
