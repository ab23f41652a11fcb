"""Measure editing, style-reference synthesis, regional re-sampling and ensembles; draw them.

One command writes every table of the "Controls" section of benchmarks/RESULTS.md (markdown
to --output and stdout, raw numbers beside it as JSON):

  python benchmarks/controls.py --workdir=runs/synthetic --ensemble_workdir=runs/synthetic_seed1 \
      --output=/tmp/controls.md

and one command draws the README's pictures from the same checkpoint:

  python benchmarks/controls.py --workdir=runs/synthetic --pictures=docs/images/

Validation examples are the first --num_examples of the split. Object edits and re-sampled
regions are chosen per example: the object class (sun, cloud, lake, building, tree) with the
most pixels in the photo's segmentation (editing) or in the mask (re-sampling). Edits swap
building <-> tree and sun <-> cloud and turn a lake into ground. The style reference of example
i is the real image of example (i + n / 2) mod n: another layout and usually another palette.
"""

import functools
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from semflow_jax import colour, controls, images, metrics, parallel, state, storage
from semflow_jax.data import pipeline
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run to measure.")
_ENSEMBLE = flags.DEFINE_string("ensemble_workdir", None, "A second run of the same config with "
                                "another seed: the ensemble table compares the two and both.")
_NUM = flags.DEFINE_integer("num_examples", 200, "Validation examples.")
_BATCH = flags.DEFINE_integer("batch_size", 100, "Examples per program call.")
_OUTPUT = flags.DEFINE_string("output", None, "Markdown file for the tables (+ .json beside).")
_PICTURES = flags.DEFINE_string("pictures", None, "Draw the README pictures into this "
                                "directory instead of measuring.")
_SECTIONS = flags.DEFINE_list("sections", ["editing", "style", "resampling", "ensembles"],
                              "Which tables to measure (ensembles needs --ensemble_workdir).")
_STRENGTHS = flags.DEFINE_list("strengths", ["1.0", "0.9", "0.8", "0.7", "0.6", "0.5", "0.4"],
                               "Style strengths t_s for the curve.")
flags.mark_flags_as_required(["workdir"])

OBJECTS = (2, 3, 4, 5, 6)                          # sun, cloud, lake, building, tree
EDITS = {2: 3, 3: 2, 4: 1, 5: 6, 6: 5}             # sun<->cloud, lake->ground, building<->tree
DILATION = 2                                       # pixels around the edit left out of "outside"


# -- what only these measurements use: preservation, colour distances ----------------------------
def dilate(mask, radius: int) -> np.ndarray:
  """bool (B, H, W) mask grown by `radius` pixels (a (2r + 1)^2 square)."""
  mask = np.asarray(mask, bool)
  padded = np.pad(mask, ((0, 0), (radius, radius), (radius, radius)))
  h, w = mask.shape[1:]
  out = np.zeros_like(mask)
  for dy in range(2 * radius + 1):
    for dx in range(2 * radius + 1):
      out |= padded[:, dy:dy + h, dx:dx + w]
  return out


def psnr(a, b, where=None) -> float:
  """PSNR in dB between uint8 images (B, H, W, 3) over the pixels where `where` (B, H, W) is
  True, from their pooled squared error; inf when they are identical there."""
  err = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
  err = err.mean(-1) if where is None else err.mean(-1)[np.asarray(where, bool)]
  mse = float(err.mean()) if err.size else 0.0
  return float("inf") if mse == 0 else 10.0 * np.log10(255.0**2 / mse)


def colour_histogram_distance(a, b, bins: int = 4) -> float:
  """Mean over image pairs of the total-variation distance (0 = same, 1 = disjoint) between
  the joint RGB histograms (bins^3 cells) of uint8 images a[i] and b[i]."""
  def histograms(x):
    cells = (np.asarray(x, np.int64) * bins) // 256
    index = (cells[..., 0] * bins + cells[..., 1]) * bins + cells[..., 2]
    index = index.reshape(len(index), -1)
    counts = np.stack([np.bincount(row, minlength=bins**3) for row in index])
    return counts / counts.sum(1, keepdims=True)
  return float(0.5 * np.abs(histograms(a) - histograms(b)).sum(1).mean())


def class_mean_colour_distance(a, labels_a, b, labels_b, num_classes: int) -> float:
  """Mean CIE76 Delta E (Lab, D65) between the mean colour of class c in a[i] and in b[i], over
  every (i, c) where c occurs in both label maps; uint8 images, (B, H, W) labels."""
  lab_a = np.asarray(colour.rgb_to_lab(np.asarray(a) / 255.0), np.float64)
  lab_b = np.asarray(colour.rgb_to_lab(np.asarray(b) / 255.0), np.float64)
  distances = []
  for i in range(len(lab_a)):
    for c in range(num_classes):
      in_a, in_b = labels_a[i] == c, labels_b[i] == c
      if in_a.any() and in_b.any():
        distances.append(np.linalg.norm(lab_a[i][in_a].mean(0) - lab_b[i][in_b].mean(0)))
  return float(np.mean(distances)) if distances else float("nan")


def batched(fn, *arrays, batch):
  """fn over leading-axis chunks of numpy `arrays`, results concatenated on the host."""
  n = len(arrays[0])
  outs = [np.asarray(fn(*(a[i:i + batch] for a in arrays))) for i in range(0, n, batch)]
  return np.concatenate(outs)


def largest_object(labels) -> np.ndarray:
  """Per example, the object class with the most pixels (-1 when there is none)."""
  counts = np.stack([(labels == c).sum((1, 2)) for c in OBJECTS], 1)
  return np.where(counts.max(1) > 0, np.asarray(OBJECTS)[counts.argmax(1)], -1)


class Bench:
  """The model, its programs and the data; each measurement is a method returning rows."""

  def __init__(self, config, workdir, num_examples, batch):
    self.config, self.batch = config, batch
    self.mesh = parallel.make_mesh(config)
    self.model = SemFlow.from_config(config)
    self.programs = Programs(self.model)
    self.params, self.step = state.load_params(config, workdir, self.mesh)
    builder = pipeline.get_builder(config.data)
    data = pipeline.load_arrays(builder, "validation", num_examples,
                                preprocess=pipeline.Preprocess.from_config(config.data))
    self.images, self.labels = data["image"], data["label"][..., 0]
    s = config.sample
    self.steps, self.method = s.synth_steps, s.method
    self.num_classes = config.data.num_classes
    self._vmapped = {}

  def run(self, name, *arrays, params=None, **static):
    """A program of `self.programs` over the arrays, in batches; rng arrays pass through."""
    program = getattr(self.programs, name)(**static)
    params = self.params if params is None else params
    return batched(lambda *a: program(params, *a), *arrays, batch=self.batch)

  def keys(self, seed, n=None):
    """One key per example, so results do not depend on the batch size."""
    return np.asarray(jax.random.split(jax.random.PRNGKey(seed), n or len(self.images)))

  def per_example(self, name, arrays, keys, params=None, **static):
    """`program(params, *arrays, *keys)` with one key per example: vmapped over examples (each
    sees a batch of one and its own keys), run in batches."""
    cache_key = (name, tuple(sorted(static.items())))
    if cache_key not in self._vmapped:
      program = getattr(self.programs, name)(**static)

      def one(p, xs, ks):
        return program(p, *(x[None] for x in xs), *ks)[0]
      self._vmapped[cache_key] = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))
    fn, params = self._vmapped[cache_key], self.params if params is None else params
    n = len(arrays)
    return batched(lambda *a: fn(params, a[:n], a[n:]), *arrays, *keys, batch=self.batch)

  def synthesize(self, labels, seed, params=None):
    return self.per_example("synthesize", (labels,), (self.keys(seed, len(labels)),),
                            params=params, steps=self.steps, method=self.method)

  def uint8(self, x):
    return batched(self.programs.to_uint8, x, batch=self.batch)

  def segment(self, images, steps, params=None):
    return self.run("segment", images, params=params, steps=steps, method=self.method)

  def miou(self, truth, images, where=None):
    """One-step segmentation of uint8 `images` against `truth`, over `where` (else all)."""
    truth = truth if where is None else np.where(where, truth, 255)
    return metrics.iou_from_confusion(metrics.confusion_matrix(
        truth, self.segment(images, 1), self.num_classes))["miou"]

  # -- 1. editing -------------------------------------------------------------------------------
  def editing(self):
    source = self.segment(self.images, self.config.sample.seg_steps).astype(np.uint8)
    obj = largest_object(source)
    keep = obj >= 0
    photo, source, obj = self.images[keep], source[keep], obj[keep]
    target = np.where(source == obj[:, None, None],
                      np.vectorize(EDITS.get)(obj)[:, None, None], source).astype(np.uint8)
    region = source != target
    outside = ~dilate(region, DILATION)
    results = {
        "end-point shift (`--edit_method=shift`)":
            self.run("edit", photo, source, target, steps=self.steps, method=self.method,
                     blend=False),
        "shift + blend (`--edit_method=blend`)":
            self.run("edit", photo, source, target, steps=self.steps, method=self.method,
                     blend=True),
        "baseline: plain synthesis of the edited mask":
            self.synthesize(target, self.config.sample.seed),
    }
    rows = []
    for name, out in results.items():
      out = self.uint8(out)
      rows.append({"method": name,
                   "psnr_outside": psnr(out, photo, outside),
                   "exact_outside": float(np.mean(np.all(out == photo, -1)[outside])),
                   "miou_inside": self.miou(target, out, region)})
    # Reference: the shift method with nothing edited is the ODE's forward-backward round trip.
    same = self.uint8(self.run("edit", photo, source, source, steps=self.steps,
                               method=self.method, blend=False))
    rows.append({"method": "reference: shift with no edit (forward + backward round trip)",
                 "psnr_outside": psnr(same, photo, outside),
                 "exact_outside": float(np.mean(np.all(same == photo, -1)[outside])),
                 "miou_inside": self.miou(source, same, region)})
    return {"rows": rows, "num_examples": int(keep.sum()),
            "edited_fraction": float(region.mean())}

  # -- 2. style reference -----------------------------------------------------------------------
  def style(self, strengths):
    n = len(self.images)
    other = (np.arange(n) + n // 2) % n
    refs, ref_labels = self.images[other], self.labels[other]
    keys = self.keys(self.config.sample.seed)

    def measure(name, out):
      return {"setting": name,
              "histogram_tv": colour_histogram_distance(out, refs),
              "class_colour_delta_e": class_mean_colour_distance(
                  out, self.labels, refs, ref_labels, self.num_classes),
              "roundtrip_miou": self.miou(self.labels, out)}

    def styled(strength, colour_transfer=False, refine=0):
      return self.uint8(self.per_example(
          "synthesize_styled", (self.labels, refs), (keys,), strength=strength, steps=self.steps,
          method=self.method, colour_transfer=colour_transfer, refine=refine))

    rows = [measure("real image of the mask (dataset spread)", self.images)]
    for s in strengths:
      label = "t_s = 1 (plain synthesis, the baseline)" if s == 1.0 else f"t_s = {s}"
      rows.append(measure(label, styled(s)))
    rows.append(measure("t_s = 1 + colour transfer", styled(1.0, True)))
    rows.append(measure("t_s = 0.7 + colour transfer", styled(0.7, True)))
    rows.append(measure("t_s = 0.7 + colour transfer + 1 refinement", styled(0.7, True, 1)))
    return {"rows": rows}

  # -- 3. regional re-sampling ------------------------------------------------------------------
  def resampling(self):
    obj = largest_object(self.labels)
    keep = obj >= 0
    labels = self.labels[keep]
    region = labels == obj[keep][:, None, None]
    band = dilate(region, DILATION) & ~region
    seed = self.config.sample.seed
    keys_a, keys_b = self.keys(seed)[keep], self.keys(seed + 1)[keep]
    original = self.per_example("synthesize", (labels,), (keys_a,), steps=self.steps,
                                method=self.method)
    independent = self.synthesize(labels, seed + 2)

    def resampled(blend):
      return self.per_example("resample", (labels, region), (keys_a, keys_b), steps=self.steps,
                              method=self.method, blend=blend)

    def change(x, where):
      return float(np.abs(x - original).mean(-1)[where].mean())

    rows = []
    for name, out in (("re-sampled, noise only", resampled(False)),
                      ("re-sampled, noise + blended trajectory", resampled(True)),
                      ("baseline: an independent plain sample", independent)):
      rows.append({"method": name, "inside": change(out, region),
                   "outside": change(out, ~region),
                   "outside_beyond_band": change(out, ~region & ~band)})
    return {"rows": rows, "num_examples": int(keep.sum()),
            "region_fraction": float(region.mean())}

  # -- 4. ensembles -----------------------------------------------------------------------------
  def ensembles(self, other_workdir):
    other, other_step = state.load_params(self.config, other_workdir, self.mesh)
    members = {"checkpoint A (--workdir)": self.params, "checkpoint B (--ensemble_workdir)": other,
               "ensemble A + B": controls.ensemble([self.params, other])}
    rows = []
    for name, params in members.items():
      row = {"model": name}
      for n in (1, self.config.sample.seg_steps):
        row[f"miou_{n}"] = metrics.iou_from_confusion(metrics.confusion_matrix(
            self.labels, self.segment(self.images, n, params), self.num_classes))["miou"]
      synth = self.synthesize(self.labels, self.config.sample.seed, params)
      synth_u8 = self.uint8(synth)
      row["roundtrip_miou"] = metrics.iou_from_confusion(metrics.confusion_matrix(
          self.labels, self.segment(synth_u8, 1, params), self.num_classes))["miou"]
      row["diversity"] = float(metrics.per_example_mean_abs_difference(
          synth, self.synthesize(self.labels, self.config.sample.seed + 1, params)).mean())
      rows.append(row)
    return {"rows": rows, "steps": [self.step, other_step]}


def _fmt(v):
  if isinstance(v, float):
    return "inf (exact)" if v == float("inf") else f"{v:.3f}"
  return str(v)


def markdown(results, command) -> str:
  meta = results["meta"]
  out = [f"Command: `{command}`", "",
         f"Checkpoint step {meta['step']} of {meta['workdir']}; {meta['num_examples']} validation "
         f"examples; {meta['steps']} {meta['method']} steps each way; "
         f"{meta['seconds']:.0f} s in all.", ""]
  headers = {
      "editing": ("method", "psnr_outside", "exact_outside", "miou_inside"),
      "style": ("setting", "histogram_tv", "class_colour_delta_e", "roundtrip_miou"),
      "resampling": ("method", "inside", "outside", "outside_beyond_band"),
      "ensembles": None,
  }
  for section, result in results.items():
    if section == "meta":
      continue
    rows = result["rows"]
    keys = headers[section] or tuple(rows[0])
    extra = {k: v for k, v in result.items() if k != "rows"}
    out += [f"**{section}** {json.dumps(extra)}", "",
            "| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    out += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    out.append("")
  return "\n".join(out)


def pictures(bench: Bench, directory: str, count: int = 4, zoom: int = 4):
  """edit.png, style.png, resample.png: `count` validation examples with an object each."""
  def big(x):
    return np.repeat(np.repeat(x, zoom, 1), zoom, 2)

  source = bench.segment(bench.images, bench.config.sample.seg_steps).astype(np.uint8)
  obj = largest_object(source)
  pick = np.flatnonzero(obj >= 0)[:count]
  photo, source, obj = bench.images[pick], source[pick], obj[pick]
  target = np.where(source == obj[:, None, None],
                    np.vectorize(EDITS.get)(obj)[:, None, None], source).astype(np.uint8)
  p, s = bench.programs, bench.config.sample
  shift = p.to_uint8(p.edit(bench.steps, bench.method, False)(bench.params, photo, source, target))
  blend = p.to_uint8(p.edit(bench.steps, bench.method, True)(bench.params, photo, source, target))
  plain = p.to_uint8(p.synthesize(bench.steps, bench.method)(bench.params, target,
                                                              jax.random.PRNGKey(s.seed)))
  columns = [photo, images.colourise(source), images.colourise(target), shift, blend, plain]
  images.write_png(storage.join(directory, "edit.png"),
                   images.grid([big(np.asarray(c)) for c in columns], pad=2))

  labels = bench.labels[pick]
  refs = bench.images[(pick + len(bench.images) // 2) % len(bench.images)]
  rng = jax.random.PRNGKey(s.seed)
  columns = [images.colourise(labels), refs]
  for strength, transfer in ((1.0, False), (0.7, False), (0.5, False), (0.7, True)):
    run = p.synthesize_styled(strength, bench.steps, bench.method, transfer)
    columns.append(np.asarray(p.to_uint8(run(bench.params, labels, refs, rng))))
  images.write_png(storage.join(directory, "style.png"),
                   images.grid([big(np.asarray(c)) for c in columns], pad=2))

  obj = largest_object(labels)
  region = labels == obj[:, None, None]
  shown = np.where(region[..., None], images.colourise(labels), images.colourise(labels) // 3)
  columns = [shown, np.asarray(p.to_uint8(p.synthesize(bench.steps, bench.method)(
      bench.params, labels, rng)))]
  for seed in (1, 2, 3):
    out = p.resample(bench.steps, bench.method)(bench.params, labels, region, rng,
                                                jax.random.PRNGKey(s.seed + seed))
    columns.append(np.asarray(p.to_uint8(out)))
  images.write_png(storage.join(directory, "resample.png"),
                   images.grid([big(np.asarray(c)) for c in columns], pad=2))
  logging.info("wrote edit.png, style.png, resample.png to %s", directory)


def main(argv):
  del argv
  config = _CONFIG.value
  start = time.time()
  bench = Bench(config, _WORKDIR.value, _NUM.value, _BATCH.value)
  if _PICTURES.value:
    pictures(bench, _PICTURES.value)
    return
  command = "python " + " ".join(sys.argv)
  results = {"meta": {"workdir": _WORKDIR.value, "step": bench.step,
                      "num_examples": len(bench.images), "steps": bench.steps,
                      "method": bench.method, "seconds": 0.0}}
  text = ""
  sections = {"editing": bench.editing,
              "style": functools.partial(bench.style, [float(s) for s in _STRENGTHS.value]),
              "resampling": bench.resampling,
              "ensembles": functools.partial(bench.ensembles, _ENSEMBLE.value)}
  unknown = set(_SECTIONS.value) - set(sections)
  if unknown:
    raise app.UsageError(f"--sections: unknown {sorted(unknown)}; expected {list(sections)}")
  if "ensembles" in _SECTIONS.value and not _ENSEMBLE.value:
    logging.warning("no --ensemble_workdir: skipping the ensembles table")
  for name in _SECTIONS.value:
    if name == "ensembles" and not _ENSEMBLE.value:
      continue
    t = time.time()
    results[name] = sections[name]()
    logging.info("%s done in %.0f s", name, time.time() - t)
    results["meta"]["seconds"] = round(time.time() - start, 1)
    # Written after every table, so a long run that is stopped keeps what it measured.
    text = markdown(results, command)
    if _OUTPUT.value:
      storage.write_text(_OUTPUT.value, text + "\n")
      storage.write_text(_OUTPUT.value + ".json", json.dumps(results, indent=2, default=str)
                         .replace("Infinity", '"inf"'))
  print(text)


if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  app.run(main)
