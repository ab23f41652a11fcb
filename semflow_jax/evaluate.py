"""Evaluation on the validation split, as the papers measure it: the protocol.

One `Evaluator` per run (train.py, --mode=eval, benchmarks/steps_quality.py) makes one pass over
the validation split per evaluation for all the metrics `config.eval.metrics` names: one
evaluator per metric in semflow_jax/evaluators/ (its docstring defines what it reports). Per
batch of `config.eval.batch_size` examples (rounded up to the devices; the last batch padded and
masked out):

- on the devices, asynchronously: each image resized whole to the model's input (no crop) and
  segmented with every sampler of `config.eval.seg_methods` x `config.eval.seg_steps`; from each
  true mask at the model's size, two syntheses a and b (`config.eval.synth_method`,
  `config.eval.synth_steps`) from perturbation noise keyed by the example's index in the split
  (so every metric is the same on any number of processes), quantised to uint8 as saved images;
  and the programs a metric adds (round trip, FID features, LPIPS);
- on the host, while the devices work on the next batch: every metric scores this process's
  examples of the previous batch.

At the end each metric combines its sums over processes and reports; process 0 writes
`eval/metrics_<step>.json` (strict JSON: a metric that is not computed is null, with the reason
under `skipped`; each metric's cost in UNet evaluations per example under `nfe`), the sample
grids `samples/segmentation_<step>.png` and `samples/synthesis_<step>.png`, and TensorBoard
scalars `eval/<metric>`. Programs come from the run's `Programs`: evaluations during training
never recompile, and `Evaluator.compile` compiles them all ahead of time.
"""

import json
import math
import time
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from semflow_jax import anchors, flow, images, metric_writer, metrics, parallel, state, storage
from semflow_jax.data import pipeline
from semflow_jax.evaluators import common
from semflow_jax.programs import Program, Programs
from semflow_jax.semflow import SemFlow

Sampler = common.Sampler
PROGRESS_EVERY_S = 10.0


def eval_batch_size(config: ml_collections.ConfigDict, mesh) -> int:
  """The global evaluation batch: config.eval.batch_size rounded up to a multiple of the
  mesh's devices."""
  n = mesh.devices.size
  return -(-config.eval.batch_size // n) * n


def example_keys(base, index):
  """Two perturbation keys per example (syntheses a and b), from its index in the split."""
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
  return (jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys),
          jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))


def _samplers(methods: Sequence[str], steps: Sequence[int]) -> list:
  out = []
  for m in methods:
    for n in steps:
      flow.check_sampler(n, m)
      if (m, int(n)) not in out:
        out.append((m, int(n)))
  return out


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f"{minutes}m{seconds:02d}s"


class Evaluator:
  """Evaluates parameters on the validation split; built once per run, called at every eval.

  `seg_samplers` / `synth_samplers` override the config's (the first synthesis sampler gives
  the plainly named synthesis metrics, the others get a `_<method>_<steps>` suffix).
  """

  def __init__(self, config: ml_collections.ConfigDict, model: SemFlow, programs: Programs,
               builder, mesh, *, seg_samplers: Optional[Sequence[Sampler]] = None,
               synth_samplers: Optional[Sequence[Sampler]] = None):
    e = config.eval
    seg = list(seg_samplers) if seg_samplers is not None else _samplers(e.seg_methods,
                                                                        e.seg_steps)
    synth = list(synth_samplers) if synth_samplers is not None else _samplers(
        [e.synth_method], [e.synth_steps])
    for m, n in seg + synth:
      flow.check_sampler(n, m)
    if not seg or not synth:
      raise ValueError("config.eval: at least one segmentation and one synthesis sampler")
    split = builder.info.splits["validation"].num_examples
    self.run = common.Run(
        config=config, model=model, programs=programs, builder=builder, mesh=mesh,
        seg_samplers=seg, synth_samplers=synth,
        num_examples=min(split, e.num_examples) if e.num_examples > 0 else split,
        batch_size=eval_batch_size(config, mesh),
        class_names=pipeline.class_names(builder, model.num_classes),
        has_alt="image_alt" in builder.info.features,
        preprocess=pipeline.Preprocess.from_config(config.data))
    names = list(e.metrics)
    if len(set(names)) != len(names):
      raise ValueError(f"config.eval.metrics={tuple(names)} names a metric twice")
    self.names = names
    self.metrics = [common.load(name)(self.run) for name in names]
    self.uses = set().union(*(m.uses for m in self.metrics))
    self.skipped = {k: v for m in self.metrics for k, v in m.skipped.items()}
    for metric, reason in sorted(self.skipped.items()):
      logging.info("evaluation: %s skipped: %s", metric, reason)
    self.base_key = jax.random.PRNGKey(config.seed + 1)
    self._example_keys = Program(example_keys, name="example_keys")
    # Quantised syntheses get exactly a real image batch's sharding, so programs run on real
    # images and on syntheses (the round trip's segmentation) share one executable.
    self._to_uint8 = Program(anchors.from_unit_range, name="to_uint8",
                             out_shardings=parallel.batch_sharding(mesh))

  def network_evaluations(self) -> dict:
    """{metric: UNet evaluations per example} for every metric this evaluator reports."""
    return {k: v for m in self.metrics for k, v in m.network_evaluations().items()}

  # -- compiling ahead of time -------------------------------------------------------------------
  def abstract_batch(self) -> dict:
    """ShapeDtypeStructs of the global batch an evaluation puts on the devices."""
    b, (h, w) = self.run.batch_size, self.run.model.image_size
    spec = {"image": ((b, h, w, 3), jnp.uint8), "label": ((b, h, w, 1), jnp.uint8),
            "index": ((b,), jnp.int32)}
    if self.run.has_alt:
      spec["image_alt"] = spec["image"]
    sharding = parallel.batch_sharding(self.run.mesh)
    return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
            for k, (shape, dtype) in spec.items()}

  def compile(self, abstract_params) -> None:
    """Compile every program an evaluation runs, at the evaluation batch's shapes, for
    parameters shaped and sharded like `abstract_params` (ShapeDtypeStructs with shardings).

    Evaluations afterwards run these executables (no second compile); a program that does not
    fit in memory fails here, e.g. beside the train step's compile, before training starts.
    """
    start = time.time()
    self._dispatch(abstract_params, self.abstract_batch(), for_grid=True)
    logging.info("evaluation programs compiled in %.1f s", time.time() - start)

  # -- one evaluation ----------------------------------------------------------------------------
  def __call__(self, params, step: int, workdir: Optional[str] = None, writer=None, *,
               should_stop: Optional[Callable[[], bool]] = None) -> Optional[dict]:
    """Evaluate `params`; with a workdir, process 0 writes eval/metrics_<step>.json, the sample
    grids and TensorBoard scalars. Returns the metrics.

    `should_stop()` is asked between batches (it must answer the same on every process); when
    it says True the evaluation ends at once, writes nothing and returns None.
    """
    start = time.time()
    self.run.should_stop = should_stop or (lambda: False)
    try:
      result, shown = self._evaluate(params, step, workdir, start)
    except common.Stopped:
      logging.warning("evaluation at step %d stopped after %.1f s: nothing written", step,
                      time.time() - start)
      return None
    finally:
      self.run.should_stop = lambda: False
    logging.info("eval at step %d: %s", step, json.dumps(
        {k: v for k, v in result.items() if not k.startswith("per_class_iou")}))  # pyright: ignore[reportAttributeAccessIssue]
    if workdir is not None and jax.process_index() == 0:
      self._write(result, shown, step, workdir, writer)
    return result

  def _evaluate(self, params, step: int, workdir: Optional[str], start: float):
    run = self.run
    for metric in self.metrics:
      metric.reset()
    per_process = run.batch_size // jax.process_count()
    keys = ("image", "label", "image_alt") if run.has_alt else ("image", "label")
    batches = pipeline.eval_batches(run.builder, "validation", per_process, run.num_examples,
                                    keys, run.preprocess,
                                    native_labels=common.NATIVE_LABELS in self.uses)
    num_batches = math.ceil(math.ceil(run.num_examples / jax.process_count()) / per_process)
    logging.info("evaluating step %d: %d examples in %d batches of %d (%s)", step,
                 run.num_examples, num_batches, run.batch_size, ", ".join(self.names))
    # One batch in flight: the devices work on batch k + 1 while the host scores batch k.
    pending, shown, last_log = None, None, start
    for k, local in enumerate(batches):
      run.check_stop()
      on_device = parallel.to_global({key: local[key] for key in keys + ("index",)}, run.mesh)
      outputs = self._dispatch(params, on_device, for_grid=k == 0)
      if pending is not None:
        shown = self._score(*pending, shown)
      pending = (local, outputs)
      now = time.time()
      if now - last_log >= PROGRESS_EVERY_S and k + 1 < num_batches:
        last_log = now
        per_batch = (now - start) / (k + 1)
        logging.info("evaluating step %d: batch %d of %d, %.1f s per batch, %s left", step,
                     k + 1, num_batches, per_batch, _duration(per_batch * (num_batches - k - 1)))
    if pending is not None:
      shown = self._score(*pending, shown)
    run.check_stop()

    result = {"step": int(step)}
    for metric in self.metrics:
      result.update(metric.result(workdir))
    result = dict(sorted(result.items(), key=lambda kv: isinstance(kv[1], dict)))  # tables last
    result["nfe"] = {k: v for k, v in self.network_evaluations().items()
                     if result.get(k) is not None}
    result["skipped"] = dict(self.skipped)
    result["num_examples"] = run.num_examples
    result["eval_seconds"] = time.time() - start
    return metrics.plain(result), shown

  def _dispatch(self, params, batch: dict, for_grid: bool):
    """Start the shared programs and every metric's own on one global batch (asynchronously);
    with ShapeDtypeStructs, compile them instead. Returns (shared outputs, [each metric's]).
    `for_grid`: also what only the sample grids show."""
    run, programs = self.run, self.run.programs
    shared = {}
    if common.SEGMENTATION in self.uses:
      for s in run.seg_samplers:
        shared[common.segmentation_key(s)] = programs.segment(s[1], s[0])(params,
                                                                          batch["image"])
    if common.SYNTHESIS in self.uses:
      keys_a, keys_b = self._example_keys(self.base_key, batch["index"])
      for s in run.synth_samplers:
        synthesize, suffix = programs.synthesize(s[1], s[0]), run.suffix(s)
        for name, keys in (("a", keys_a), ("b", keys_b)):
          x = synthesize(params, batch["label"], keys)
          shared[common.synthesis_key(name, suffix)] = x
          shared[common.synthesis_key(f"{name}_uint8", suffix)] = self._to_uint8(x)
      if for_grid:  # the perturbed anchor image synthesis a starts from: the grid's 1st column
        shared["anchors"] = programs.get("perturbed_anchors")(batch["label"], keys_a)
    return shared, [metric.device(params, batch, shared) for metric in self.metrics]

  def _score(self, local: dict, outputs, shown: Optional[dict]) -> dict:
    """Score one batch on the host; returns the rows the sample grids show (the first
    batch's)."""
    shared, own = outputs
    batch = common.HostBatch(local, common.Rows(shared))
    for metric, out in zip(self.metrics, own):
      metric.update(batch, common.Rows(out))
    if shown is not None:
      return shown
    m = batch.mask
    shown = {"image": local["image"][m], "label": batch.label[m]}
    if common.SEGMENTATION in self.uses:
      shown["segmentation"] = batch.shared[common.segmentation_key(self.run.main_seg_sampler)][m]
    if common.SYNTHESIS in self.uses:
      shown.update(anchors=anchors.from_unit_range(batch.shared["anchors"][m]),
                   a=batch.shared[common.synthesis_key("a_uint8", "")][m],
                   b=batch.shared[common.synthesis_key("b_uint8", "")][m])
      if self.run.has_alt:
        shown["alt"] = local["image_alt"][m]
    return shown

  def _write(self, result: dict, shown: Optional[dict], step: int, workdir: str, writer):
    storage.write_json(storage.join(workdir, "eval", f"metrics_{step}.json"), result)
    grids = {}
    n = self.run.config.eval.num_sample_images
    if shown is not None and len(shown["image"]) and n > 0:
      s = {k: v[:n] for k, v in shown.items()}
      if "segmentation" in s:
        grids["segmentation"] = images.segmentation_grid(s["image"], s["label"],
                                                         s["segmentation"])
      if "a" in s:
        grids["synthesis"] = images.synthesis_grid(s["anchors"], s["a"], s["b"], s["image"],
                                                   s.get("alt"))
      for name, grid in grids.items():
        images.write_png(storage.join(workdir, "samples", f"{name}_{step}.png"), grid)
    if writer is None:
      return
    scalars = {f"eval/{k}": v for k, v in result.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
    for metric in self.metrics:
      scalars.update(metric.tensorboard(result))
    writer.write_scalars(step, scalars)
    if grids:
      writer.write_images(step, {f"eval/{k}": v[None] for k, v in grids.items()})
    writer.flush()


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """--mode=eval: evaluate the latest checkpoint in `workdir`."""
  mesh = parallel.make_mesh(config)
  model = SemFlow.from_config(config, mesh)
  params, step = state.load_params(config, workdir, mesh)
  writer = metric_writer.for_run(workdir, config)
  builder = pipeline.get_builder(config.data)
  evaluator = Evaluator(config, model, Programs(model), builder, mesh)
  result = evaluator(params, step, workdir, writer)
  writer.close()
  return result
