"""Evaluation on the validation split, as the papers measure it.

Segmentation (`miou_<method>_<n>`, `per_class_iou_<method>_<n>`): every image is resized whole
to the model's input (no crop), segmented by integrating t 0 -> 1 with `n` steps of the sampler
`method` (euler, heun, rk4: `config.eval.seg_methods` x `config.eval.seg_steps`), and the
prediction is resized back to the label's native size with nearest neighbour and scored there:
one confusion matrix over the split (ignore label 255 left out, padded examples masked out,
summed over batches, devices and hosts), IoU per class named by the dataset's classes, mIoU
over the classes present in truth or prediction (metrics.py; equal to Cityscapes' official
pixel-level evaluation, tested). A class with no IoU is `null` in the JSON, never NaN.

Synthesis (`config.eval.synth_method`, `config.eval.synth_steps`): from each true mask at the
model's size, twice with different perturbation noise (a, b), t 1 -> 0. The noise of example i is
keyed by i's index in the split, so every metric is the same on any number of processes.
- roundtrip_miou: segment synthesis a (quantised to uint8, as a saved image) with ONE Euler
  step, mIoU against the input mask at the model's size (one step, so it measures the images,
  not how reversible the ODE is).
- diversity: mean |a - b| in [-1, 1] units; diversity_real: the same between two real renderings
  of one mask, where the dataset has them (`image_alt`).
- colour_only_miou(_synth): a per-pixel Gaussian colour classifier fitted once per run on
  training pixels, scored on real and on synthesised images at the model's size: what colour
  alone gets (`config.eval.colour_only`; off for the real datasets, where it costs host time
  and means little).
- fid, lpips_diversity (SemFlow's: LPIPS between a and b of the same mask), lpips_to_real
  (SymmFlow's: LPIPS between a and the real image): when `config.eval.fid_weights` /
  `config.eval.lpips_weights` name converted networks; otherwise null, with the reason logged
  and recorded under `skipped`.

Every metric's cost in network (UNet) evaluations is recorded under `nfe`. An `Evaluator` is
built once per run (train.py, --mode=eval): its programs come from the run's `Programs`, so
evaluations during training never recompile, and the colour classifier is fitted once.
"""

import dataclasses
import json
import math
import time
from typing import Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from semflow_jax import flow, images, metrics, parallel, state, storage
from semflow_jax.data import pipeline
from semflow_jax.models import inception as inception_lib
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow

Sampler = Tuple[str, int]  # (method, steps)
ROUNDTRIP_SAMPLER: Sampler = ("euler", 1)
DEVICE_KEYS = ("image", "label", "mask", "index")


@jax.jit
def _example_keys(base, index):
  """Two perturbation keys per example (syntheses a and b), from its index in the split."""
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
  return (jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys),
          jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))


def local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of a batch-sharded global array, in order (its own examples)."""
  shards = {s.index[0].start or 0: s.data for s in x.addressable_shards}
  return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """Sum of a host array over processes, bit-exact for int64/float64 (moved as uint32 words)."""
  x = np.ascontiguousarray(x)
  if jax.process_count() == 1:
    return x
  words = multihost_utils.process_allgather(x.view(np.uint32), tiled=False)
  return np.asarray(words).view(x.dtype).reshape(-1, *x.shape).sum(0)


def _samplers(methods: Sequence[str], steps: Sequence[int]) -> list:
  out = []
  for m in methods:
    for n in steps:
      flow.check_sampler(n, m)
      if (m, int(n)) not in out:
        out.append((m, int(n)))
  return out


@dataclasses.dataclass
class _Accumulator:
  """What one evaluation sums up on this process (combined over processes at the end)."""
  confusion: dict          # name -> (C, C) int64
  per_example: dict        # name -> (num_examples,) float64, filled at each example's index
  fid: dict                # name -> RunningStatistics of this process's synthesis features
  shown: Optional[dict] = None


class Evaluator:
  """Evaluates parameters on the validation split; built once per run, called at every eval.

  `seg_samplers` / `synth_samplers` override the config's (the first synthesis sampler gives
  the plainly named synthesis metrics, the others get a `_<method>_<steps>` suffix).
  """

  def __init__(self, config: ml_collections.ConfigDict, model: SemFlow, programs: Programs,
               builder, mesh, *, seg_samplers: Optional[Sequence[Sampler]] = None,
               synth_samplers: Optional[Sequence[Sampler]] = None):
    e = config.eval
    self.config, self.model, self.programs, self.builder, self.mesh = (config, model, programs,
                                                                       builder, mesh)
    self.seg_samplers = list(seg_samplers) if seg_samplers is not None else _samplers(
        e.seg_methods, e.seg_steps)
    self.synth_samplers = list(synth_samplers) if synth_samplers is not None else _samplers(
        [e.synth_method], [e.synth_steps])
    for m, n in self.seg_samplers + self.synth_samplers:
      flow.check_sampler(n, m)
    if not self.seg_samplers or not self.synth_samplers:
      raise ValueError("config.eval: at least one segmentation and one synthesis sampler")
    n_dev = mesh.devices.size
    self.batch_size = -(-e.batch_size // n_dev) * n_dev  # a multiple of the devices
    self.per_process = self.batch_size // jax.process_count()
    self.has_alt = "image_alt" in builder.info.features
    self.keys = ("image", "label", "image_alt") if self.has_alt else ("image", "label")
    self.preprocess = pipeline.Preprocess.from_config(config.data)
    split = builder.info.splits["validation"].num_examples
    self.num_examples = min(split, e.num_examples) if e.num_examples > 0 else split
    self.class_names = pipeline.class_names(builder, model.num_classes)
    self.base_key = jax.random.PRNGKey(config.seed + 1)
    self.skipped = {}
    self._colour = None
    if not e.get("colour_only", True):
      self.skipped["colour_only_miou"] = self.skipped["colour_only_miou_synth"] = (
          "config.eval.colour_only is False")
    # FID and LPIPS networks (semflow_jax/perceptual.py), loaded once per run when configured.
    self.inception = self.lpips = None
    self._fid_reference = None  # (mu, sigma) of the real split, computed or read once per run
    if e.get("fid_weights"):
      from semflow_jax import convert_eval_nets, perceptual
      self.inception = perceptual.InceptionFeatures(
          convert_eval_nets.load_inception(e.fid_weights), mesh)
    else:
      self.skipped["fid"] = ("config.eval.fid_weights is not set (convert pytorch-fid's "
                             "weights with python -m semflow_jax.convert_eval_nets; README)")
    if not e.get("lpips_weights"):
      reason = ("config.eval.lpips_weights is not set (convert the AlexNet and v0.1 head "
                "weights with python -m semflow_jax.convert_eval_nets; README)")
    elif min(model.image_size) < 32:
      reason = f"LPIPS' AlexNet needs images of at least 32x32, not {model.image_size}"
    else:
      from semflow_jax import convert_eval_nets, perceptual
      self.lpips = perceptual.LpipsDistances(convert_eval_nets.load_lpips(e.lpips_weights), mesh)
      reason = None
    if reason:
      self.skipped["lpips_diversity"] = self.skipped["lpips_to_real"] = reason
    for metric, reason in sorted(self.skipped.items()):
      logging.info("evaluation: %s skipped: %s", metric, reason)

  # -- the parts fixed for a run -----------------------------------------------------------------
  @property
  def colour_classifier(self) -> Optional[metrics.ColourClassifier]:
    """Fitted on the first `eval.colour_fit_examples` training images, once per run."""
    if "colour_only_miou" in self.skipped:
      return None
    if self._colour is None:
      train = pipeline.load_arrays(self.builder, "train", self.config.eval.colour_fit_examples,
                                   preprocess=self.preprocess)
      self._colour = metrics.ColourClassifier.fit(train["image"], train["label"],
                                                  self.model.num_classes)
    return self._colour

  def fid_reference(self, workdir: Optional[str]) -> tuple:
    """(mu, sigma) of the real validation images as the model sees them (resized whole to its
    input), computed once per run and cached as an .npz: `config.eval.fid_reference`, or
    eval/fid_reference.npz in the workdir (refused if it describes other data)."""
    if self._fid_reference is None:
      from semflow_jax import perceptual
      batches = pipeline.eval_batches(self.builder, "validation", self.per_process,
                                      self.num_examples, ("image",), self.preprocess)
      description = {"dataset": self.builder.info.full_name, "split": "validation",
                     "num_examples": self.num_examples, "image_size": list(self.model.image_size)}
      cache = self.config.eval.get("fid_reference") or (
          storage.join(workdir, "eval", "fid_reference.npz") if workdir else None)
      # Every process takes the same branch (computing is collective): process 0 decides.
      cached = bool(cache) and bool(multihost_utils.broadcast_one_to_all(
          np.asarray(storage.exists(cache))))
      if cached:
        logging.info("FID reference statistics from %s", cache)
        self._fid_reference = perceptual.read_statistics(cache, description)
      else:
        mu, sigma, count = perceptual.statistics_of(batches, self.inception,
                                                    what="the reference split")
        if cache and jax.process_index() == 0:
          perceptual.write_statistics(cache, mu, sigma, count, description)
          logging.info("wrote FID reference statistics of %d images to %s", count, cache)
        self._fid_reference = (mu, sigma)
    return self._fid_reference

  @property
  def main_seg_sampler(self) -> Sampler:
    """The first method's most-step sampler: its predictions are shown and its per-class IoU
    goes to TensorBoard."""
    method = self.seg_samplers[0][0]
    return max((s for s in self.seg_samplers if s[0] == method), key=lambda s: s[1])

  def network_evaluations(self) -> dict:
    """{metric: UNet evaluations per example} for every metric this evaluator reports."""
    nfe = {}
    for m, n in self.seg_samplers:
      nfe[f"miou_{m}_{n}"] = flow.network_evaluations(n, m)
    for i, (m, n) in enumerate(self.synth_samplers):
      suffix = "" if i == 0 else f"_{m}_{n}"
      synth = flow.network_evaluations(n, m)
      nfe[f"roundtrip_miou{suffix}"] = synth + flow.network_evaluations(ROUNDTRIP_SAMPLER[1],
                                                                         ROUNDTRIP_SAMPLER[0])
      for name in ("diversity", "colour_only_miou_synth", "fid", "lpips_diversity",
                   "lpips_to_real"):
        nfe[f"{name}{suffix}"] = synth
    return nfe

  # -- one evaluation ----------------------------------------------------------------------------
  def compile(self, abstract_params) -> None:
    """Compile every large program an evaluation runs, for parameters shaped and laid out like
    `abstract_params` (ShapeDtypeStructs): a program that does not fit fails now, not at the
    first evaluation. The evaluations then reuse these executables."""
    batch = self._abstract_batch()
    lowered = _example_keys.lower(self.base_key, batch["index"])
    shapes, shardings = lowered.out_info, lowered.compile().output_shardings
    keys_a = jax.ShapeDtypeStruct(shapes[0].shape, shapes[0].dtype, sharding=shardings[0])
    for m, n in sorted(set(self.seg_samplers) | {ROUNDTRIP_SAMPLER}):
      self.programs.segment(n, m).lower(abstract_params, batch["image"]).compile()
    for m, n in self.synth_samplers:
      self.programs.synthesize(n, m).lower(abstract_params, batch["label"], keys_a).compile()

  def _abstract_batch(self) -> dict:
    """The global device batch `_dispatch` builds, as ShapeDtypeStructs."""
    template = pipeline._empty_batch(self.builder, self.keys, self.preprocess)
    sharding = parallel.batch_sharding(self.mesh)
    out = {k: jax.ShapeDtypeStruct((self.batch_size, *v.shape[1:]), v.dtype, sharding=sharding)
           for k, v in template.items() if k in ("image", "label")}
    out["index"] = jax.ShapeDtypeStruct((self.batch_size,), np.int32, sharding=sharding)
    return out

  def __call__(self, params, step: int, workdir: Optional[str] = None, writer=None, *,
               should_stop=None) -> Optional[dict]:
    """Evaluate `params`; with a workdir, write eval/metrics_<step>.json, sample grids and
    TensorBoard scalars (process 0). Returns the metrics.

    `should_stop()` is asked before every batch; when it says True the evaluation returns None
    at once and writes nothing (the caller makes its answer agree across processes)."""
    start = time.time()
    c = self.model.num_classes
    acc = _Accumulator(confusion={}, per_example={}, fid={})
    for m, n in self.seg_samplers:
      acc.confusion[f"miou_{m}_{n}"] = np.zeros((c, c), np.int64)
    synth_names = []
    for i, (m, n) in enumerate(self.synth_samplers):
      suffix = "" if i == 0 else f"_{m}_{n}"
      synth_names.append(suffix)
      acc.confusion[f"roundtrip_miou{suffix}"] = np.zeros((c, c), np.int64)
      acc.per_example[f"diversity{suffix}"] = np.zeros(self.num_examples)
      if self.colour_classifier is not None:
        acc.confusion[f"colour_only_miou_synth{suffix}"] = np.zeros((c, c), np.int64)
      if self.inception is not None:
        acc.fid[f"fid{suffix}"] = inception_lib.RunningStatistics()
      if self.lpips is not None:
        acc.per_example[f"lpips_diversity{suffix}"] = np.zeros(self.num_examples)
        acc.per_example[f"lpips_to_real{suffix}"] = np.zeros(self.num_examples)
    if self.colour_classifier is not None:
      acc.confusion["colour_only_miou"] = np.zeros((c, c), np.int64)
    if self.has_alt:
      acc.per_example["diversity_real"] = np.zeros(self.num_examples)

    batches = pipeline.eval_batches(self.builder, "validation", self.per_process,
                                    self.num_examples, self.keys, self.preprocess,
                                    native_labels=True)
    # One batch in flight: the device works on batch k + 1 while the host scores batch k.
    pending = None
    num_batches = math.ceil(math.ceil(self.num_examples / jax.process_count()) /
                            self.per_process)
    last_log = time.time()
    for k, local in enumerate(batches):
      if should_stop is not None and should_stop():
        logging.info("evaluation at step %d stopped at batch %d of %d", step, k + 1, num_batches)
        return None
      outputs = self._dispatch(params, local)
      if pending is not None:
        self._accumulate(acc, *pending, synth_names)
      pending = (local, outputs)
      if time.time() - last_log > 60:
        last_log = time.time()
        logging.info("evaluating: batch %d of %d (%.1f s per batch)", k + 1, num_batches,
                     (last_log - start) / (k + 1))
    if pending is not None:
      self._accumulate(acc, *pending, synth_names)

    result = self._finish(acc, step, time.time() - start, workdir)
    logging.info("eval at step %d: %s", step, json.dumps(
        {k: v for k, v in result.items() if not k.startswith("per_class_iou")}))
    if workdir is not None and jax.process_index() == 0:
      self._write(result, acc.shown, step, workdir, writer)
    return result

  def _dispatch(self, params, local: dict) -> dict:
    """Start every program on one batch (asynchronously); returns the device arrays."""
    device_keys = DEVICE_KEYS + (("image_alt",) if self.has_alt else ())
    batch = parallel.to_global({k: local[k] for k in device_keys}, self.mesh)
    out = {"seg": {}, "synth": []}
    for m, n in self.seg_samplers:
      out["seg"][(m, n)] = self.programs.segment(n, m)(params, batch["image"])
    keys_a, keys_b = _example_keys(self.base_key, batch["index"])
    roundtrip = self.programs.segment(ROUNDTRIP_SAMPLER[1], ROUNDTRIP_SAMPLER[0])
    for m, n in self.synth_samplers:
      synthesize = self.programs.synthesize(n, m)
      a = synthesize(params, batch["label"], keys_a)
      b = synthesize(params, batch["label"], keys_b)
      # The same sharding object as a real image batch, so the round trip reuses the
      # one-step segmentation program compiled for real images instead of compiling another.
      a_uint8 = jax.device_put(self.programs.to_uint8(a), batch["image"].sharding)
      synth = {"a": a, "b": b, "a_uint8": a_uint8, "roundtrip": roundtrip(params, a_uint8)}
      if not out["synth"]:  # the perturbed anchor image synthesis a starts from, for the grid
        synth["anchors"] = self.programs.to_uint8(
            self.programs.get("perturbed_anchors")(batch["label"], keys_a))
      if self.inception is not None:
        synth["features"] = self.inception.device(a_uint8)
      if self.lpips is not None:
        b_uint8 = jax.device_put(self.programs.to_uint8(b), batch["image"].sharding)
        synth["lpips_ab"] = self.lpips.device(a_uint8, b_uint8)
        synth["lpips_real"] = self.lpips.device(a_uint8, batch["image"])
      out["synth"].append(synth)
    return out

  def _accumulate(self, acc: _Accumulator, local: dict, out: dict, synth_names) -> None:
    """Score one batch on this process's examples (host)."""
    c = self.model.num_classes
    mask = local["mask"] > 0
    index = local["index"][mask]
    label = local["label"][..., 0]
    for (m, n), prediction in out["seg"].items():
      acc.confusion[f"miou_{m}_{n}"] += metrics.native_confusion(
          local_rows(prediction), local[pipeline.NATIVE_LABEL_KEY],
          local[pipeline.NATIVE_SIZE_KEY], c, mask)
    colour = self.colour_classifier
    if colour is not None:
      acc.confusion["colour_only_miou"] += metrics.confusion_matrix(
          label, colour.predict(local["image"]), c, mask)
    if self.has_alt:
      acc.per_example["diversity_real"][index] = metrics.per_example_mean_abs_difference(
          _unit(local["image"][mask]), _unit(local["image_alt"][mask]))
    for suffix, synth in zip(synth_names, out["synth"]):
      a, b = local_rows(synth["a"]), local_rows(synth["b"])
      a_uint8 = local_rows(synth["a_uint8"])
      acc.confusion[f"roundtrip_miou{suffix}"] += metrics.confusion_matrix(
          label, local_rows(synth["roundtrip"]), c, mask)
      acc.per_example[f"diversity{suffix}"][index] = metrics.per_example_mean_abs_difference(
          a[mask], b[mask])
      if colour is not None:
        acc.confusion[f"colour_only_miou_synth{suffix}"] += metrics.confusion_matrix(
            label, colour.predict(a_uint8), c, mask)
      if "features" in synth:
        acc.fid[f"fid{suffix}"].update(local_rows(synth["features"])[mask])
      if "lpips_ab" in synth:
        acc.per_example[f"lpips_diversity{suffix}"][index] = local_rows(synth["lpips_ab"])[mask]
        acc.per_example[f"lpips_to_real{suffix}"][index] = local_rows(synth["lpips_real"])[mask]
      if acc.shown is None and suffix == "":
        acc.shown = dict(image=local["image"], label=label,
                         seg=local_rows(out["seg"][self.main_seg_sampler]), synth_a=a_uint8,
                         synth_b=np.asarray(_to_uint8(b)), anchors=local_rows(synth["anchors"]),
                         alt=local.get("image_alt"), mask=mask)

  def _finish(self, acc: _Accumulator, step: int, seconds: float, workdir=None) -> dict:
    """Combine over processes and turn sums into metrics (plain Python, None for undefined)."""
    names = sorted(acc.confusion)
    confusion = sum_over_processes(np.stack([acc.confusion[k] for k in names]))
    per_names = sorted(acc.per_example)
    per_example = dict(zip(per_names, sum_over_processes(
        np.stack([acc.per_example[k] for k in per_names]))))
    result = {"step": int(step)}
    for m, n in self.seg_samplers:
      scores = metrics.iou_from_confusion(confusion[names.index(f"miou_{m}_{n}")])
      result[f"miou_{m}_{n}"] = scores["miou"]
    for name in names:
      if not name.startswith("miou_"):
        result[name] = metrics.iou_from_confusion(confusion[names.index(name)])["miou"]
    for name, values in per_example.items():
      result[name] = float(np.mean(values)) if len(values) else None
    if acc.fid:
      reference = self.fid_reference(workdir)
      for name, running in sorted(acc.fid.items()):
        # Per-process sums of features and their outer products add up to the split's.
        total = inception_lib.RunningStatistics(running.dim)
        total.count = int(sum_over_processes(np.array([running.count], np.int64))[0])
        total.sum = sum_over_processes(running.sum)
        total.outer = sum_over_processes(running.outer)
        result[name] = (metrics.frechet_distance(*total.result(), *reference)
                        if total.count >= 2 else None)  # a covariance needs two images
    for name in ("diversity_real", "colour_only_miou", "colour_only_miou_synth", "fid",
                 "lpips_diversity", "lpips_to_real"):
      result.setdefault(name, None)  # JSON null: not computed (see `skipped`)
    for m, n in self.seg_samplers:
      per_class = metrics.iou_from_confusion(confusion[names.index(f"miou_{m}_{n}")])
      result[f"per_class_iou_{m}_{n}"] = dict(zip(self.class_names, per_class["per_class_iou"]))
    result["nfe"] = {k: v for k, v in self.network_evaluations().items()
                     if result.get(k) is not None}
    result["skipped"] = dict(self.skipped)
    result["num_examples"] = self.num_examples
    result["eval_seconds"] = seconds
    return result

  def _write(self, result: dict, shown: Optional[dict], step: int, workdir: str, writer):
    storage.write_json(storage.join(workdir, "eval", f"metrics_{step}.json"), _strict(result))
    if writer is None:
      return
    scalars = {f"eval/{k}": v for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    main = self.main_seg_sampler
    for name, value in result[f"per_class_iou_{main[0]}_{main[1]}"].items():
      if value is not None:
        tag = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in name)
        scalars[f"eval/per_class_iou_{main[0]}_{main[1]}/{tag}"] = value
    writer.write_scalars(step, scalars)
    if shown is not None:
      n = self.config.eval.num_sample_images
      s = {k: v[shown["mask"]][:n] for k, v in shown.items() if v is not None and k != "mask"}
      if len(s["image"]):
        seg_grid = images.grid([s["image"], images.colourise(s["label"]),
                                images.colourise(s["seg"])])
        # The synthesis grid starts with the perturbed anchor image synthesis a started from
        # (the model's palette and perturbation, as the model sees them).
        columns = [s["anchors"], s["synth_a"], s["synth_b"], s["image"]]
        if "alt" in s:
          columns.append(s["alt"])
        synth_grid = images.grid(columns)
        images.write_png(storage.join(workdir, "samples", f"segmentation_{step}.png"), seg_grid)
        images.write_png(storage.join(workdir, "samples", f"synthesis_{step}.png"), synth_grid)
        writer.write_images(step, {"eval/segmentation": seg_grid[None],
                                   "eval/synthesis": synth_grid[None]})
    writer.flush()


def _strict(obj):
  """Strict JSON has no NaN or infinity: a number that is not finite is written null."""
  if isinstance(obj, dict):
    return {k: _strict(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [_strict(v) for v in obj]
  if isinstance(obj, (float, np.floating)):
    return metrics.valid_or_none(obj)
  return obj


def _unit(x_uint8: np.ndarray) -> np.ndarray:
  """uint8 -> float64 in [-1, 1] (as anchors.to_unit_range, on the host)."""
  return np.asarray(x_uint8, np.float64) / 127.5 - 1.0


def _to_uint8(x: np.ndarray) -> np.ndarray:
  """[-1, 1] -> uint8 (as anchors.from_unit_range, on the host)."""
  return np.round(np.clip((np.asarray(x) + 1.0) * 127.5, 0, 255)).astype(np.uint8)


def run(model: SemFlow, params, builder, config: ml_collections.ConfigDict, mesh, step: int,
        workdir: str, writer, programs: Optional[Programs] = None) -> dict:
  """One evaluation with a fresh Evaluator (a run that evaluates repeatedly keeps one)."""
  evaluator = Evaluator(config, model, programs or Programs(model), builder, mesh)
  return evaluator(params, step, workdir, writer)


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=eval: evaluate the latest checkpoint in `workdir`."""
  mesh = parallel.make_mesh(config)
  model = SemFlow.from_config(config, mesh)
  params, step = state.load_params(config, workdir, mesh)
  writer = storage.metric_writer(workdir, config)
  builder = pipeline.get_builder(config.data)
  evaluator = Evaluator(config, model, Programs(model), builder, mesh)
  result = evaluator(params, step, workdir, writer)
  writer.close()
  return result
