"""Screening of the default config's synthesis against every README main-job target (issue #23).

  python benchmarks/screen_synthesis.py --workdir=runs/synthetic
  python benchmarks/screen_synthesis.py --workdir=runs/synthetic --synth=rk4:1,heun:1,euler:2 \
      --config.model.perturbation=0.3

Pass the config the run was trained with (default: configs/synthetic.py) and any overrides
(`--config.model.perturbation=...` changes the synthesis noise at evaluation only: a checkpoint
records its palette, not its perturbation). For the latest checkpoint in --workdir:

1. One evaluation by `semflow_jax.evaluate.Evaluator`, the class `--mode=eval` runs, with the
   segmentation samplers --seg and every synthesis sampler of --synth at once: mIoU, round trip,
   diversity, colour-only mIoU of real and synthesised images, exactly as the main job reports
   them (the first synthesis sampler plainly named, the others with a `_<method>_<steps>` suffix).
2. The two figures issue #23 adds, computed here on the same syntheses (same programs, same
   per-example keys as the evaluator):
   - hf_energy: for an image x in [-1, 1], the mean over pixels and channels of
     (x - box3(x))^2, box3 the 3x3 mean filter with edge-replicated padding; `hf_energy_synth`
     over syntheses a, `hf_energy_real` over the real validation images at the model's size.
     Target: synth / real in [0.8, 1.25] (neither noisier nor blurrier than real images).
   - diversity_down4: mean |a - b| after 4x4 average pooling of the two syntheses of a mask
     ([-1, 1] units), `diversity_real_down4` the same between the real renderings `image` and
     `image_alt`: diversity that pixel noise cannot inflate. Target: >= 0.45 x the real one.

Prints one markdown row per synthesis sampler with every target's figure and writes everything
to --output (default `<workdir>/eval/screen_<step>.json`).
"""

import time

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from semflow_jax import evaluate, flow, parallel, state, storage
from semflow_jax.data import pipeline
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py",
                                          "The config the run was trained with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run (its latest checkpoint).")
_SEG = flags.DEFINE_list("seg", ["euler:1", "euler:25"], "Segmentation samplers, method:steps.")
_SYNTH = flags.DEFINE_list("synth", ["rk4:1"], "Synthesis samplers, method:steps.")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", -1, "Validation examples; -1: all.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON to write (default in the workdir's eval/).")
_GRID = flags.DEFINE_bool("grid", True, "Also write <output>_<method>_<steps>.png: perturbed "
                          "anchors, syntheses a and b, the two real renderings, 8 masks.")
flags.mark_flags_as_required(["workdir"])

# The README main job's targets (issue #23), as (name, figure, test) on one metrics dict.
TARGETS = (
    ("miou_euler_25", lambda m: m["miou_euler_25"],
     lambda m, v: v >= 0.80 and v >= m["colour_only_miou"] + 0.2),
    ("miou_euler_1", lambda m: m["miou_euler_1"], lambda m, v: v >= 0.82),
    ("roundtrip", lambda m: m["roundtrip_miou"], lambda m, v: v >= 0.82),
    ("colour", lambda m: m["colour_only_miou_synth"] / m["colour_only_miou"],
     lambda m, v: v >= 0.9),
    ("diversity", lambda m: m["diversity"] / m["diversity_real"], lambda m, v: v >= 0.45),
    ("hf", lambda m: m["hf_energy_synth"] / m["hf_energy_real"],
     lambda m, v: 0.8 <= v <= 1.25),
    ("div_down4", lambda m: m["diversity_down4"] / m["diversity_real_down4"],
     lambda m, v: v >= 0.45),
)


# -- the two figures (numpy, float64; images (N, H, W, C) in [-1, 1]) ----------------------------
def box3(x: np.ndarray) -> np.ndarray:
  """3x3 mean filter over H and W with edge-replicated padding."""
  x = np.asarray(x, np.float64)
  p = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
  h, w = x.shape[1:3]
  return sum(p[:, i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def hf_energy(x: np.ndarray) -> np.ndarray:
  """(N,) mean over pixels and channels of (x - box3(x))^2 per image."""
  x = np.asarray(x, np.float64)
  return np.square(x - box3(x)).reshape(len(x), -1).mean(1)


def downsample(x: np.ndarray, factor: int = 4) -> np.ndarray:
  """factor x factor average pooling (H and W divisible by factor)."""
  n, h, w, c = x.shape
  return np.asarray(x, np.float64).reshape(n, h // factor, factor, w // factor, factor,
                                           c).mean((2, 4))


def diversity_down4(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """(N,) mean |a - b| after 4x4 average pooling."""
  return np.abs(downsample(a) - downsample(b)).reshape(len(a), -1).mean(1)


def unit(x_uint8: np.ndarray) -> np.ndarray:
  return np.asarray(x_uint8, np.float64) / 127.5 - 1.0


@jax.jit
def example_keys(base, index):
  """The evaluator's two perturbation keys per example (syntheses a and b), from its index."""
  keys = jax.vmap(lambda i: jax.random.fold_in(base, i))(index)
  return (jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys),
          jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys))


def parse(samplers) -> list:
  out = []
  for s in samplers:
    method, _, steps = s.partition(":")
    flow.check_sampler(int(steps), method)
    out.append((method, int(steps)))
  return out


def new_figures(config, model, programs, params, builder, mesh, synth_samplers, num_examples,
                base_key) -> tuple:
  """({suffix: {hf_energy_synth, diversity_down4}}, {hf_energy_real, diversity_real_down4},
  {suffix: first 8 rows for the grid}) over the first `num_examples` validation examples."""
  n_dev = mesh.devices.size
  batch_size = -(-config.eval.batch_size // n_dev) * n_dev
  preprocess = pipeline.Preprocess.from_config(config.data)
  keys = ("image", "label", "image_alt") if "image_alt" in builder.info.features else (
      "image", "label")
  sums = {s: {"hf": [], "down4": [], "full": []} for s in synth_samplers}
  real = {"hf": [], "down4": []}
  shown = {}
  for local in pipeline.eval_batches(builder, "validation", batch_size, num_examples, keys,
                                     preprocess):
    mask = local["mask"] > 0
    batch = parallel.to_global({k: local[k] for k in ("image", "label", "index")}, mesh)
    keys_a, keys_b = example_keys(base_key, batch["index"])
    real["hf"].append(hf_energy(unit(local["image"][mask])))
    if "image_alt" in local:
      real["down4"].append(diversity_down4(unit(local["image"][mask]),
                                           unit(local["image_alt"][mask])))
    for m, n in synth_samplers:
      synthesize = programs.synthesize(n, m)
      a = evaluate.local_rows(synthesize(params, batch["label"], keys_a))[mask]
      b = evaluate.local_rows(synthesize(params, batch["label"], keys_b))[mask]
      sums[(m, n)]["hf"].append(hf_energy(a))
      sums[(m, n)]["down4"].append(diversity_down4(a, b))
      sums[(m, n)]["full"].append(np.abs(a - b).reshape(len(a), -1).mean(1))
      if (m, n) not in shown:
        anchors = programs.to_uint8(programs.get("perturbed_anchors")(batch["label"], keys_a))
        to8 = lambda x: np.asarray(programs.to_uint8(x))
        shown[(m, n)] = [evaluate.local_rows(anchors)[mask][:8], to8(a[:8]), to8(b[:8]),
                         local["image"][mask][:8]] + (
                             [local["image_alt"][mask][:8]] if "image_alt" in local else [])
  synth = {s: {"hf_energy_synth": float(np.concatenate(v["hf"]).mean()),
               "diversity_down4": float(np.concatenate(v["down4"]).mean()),
               # Must equal the evaluator's `diversity`: the same syntheses (checked in main).
               "diversity_here": float(np.concatenate(v["full"]).mean())}
           for s, v in sums.items()}
  reference = {"hf_energy_real": float(np.concatenate(real["hf"]).mean()),
               "diversity_real_down4": (float(np.concatenate(real["down4"]).mean())
                                        if real["down4"] else None)}
  return synth, reference, shown


def row(metrics: dict) -> tuple:
  """(cells, all met) for one sampler's metrics."""
  cells, ok = [], True
  for name, figure, test in TARGETS:
    try:
      v = figure(metrics)
      met = bool(test(metrics, v))
    except (KeyError, TypeError, ZeroDivisionError):
      cells.append("-")
      ok = False
      continue
    ok &= met
    cells.append(f"{v:.3f}" if met else f"**{v:.3f}**")
  return cells, ok


def main(argv):
  del argv
  config = _CONFIG.value
  if _NUM_EXAMPLES.value > 0:
    config.eval.num_examples = _NUM_EXAMPLES.value
  seg_samplers, synth_samplers = parse(_SEG.value), parse(_SYNTH.value)
  mesh = parallel.make_mesh(config)
  model = SemFlow.from_config(config, mesh)
  params, step = state.load_params(config, _WORKDIR.value, mesh)
  builder = pipeline.get_builder(config.data)
  programs = Programs(model)
  evaluator = evaluate.Evaluator(config, model, programs, builder, mesh,
                                 seg_samplers=seg_samplers, synth_samplers=synth_samplers)
  start = time.time()
  result = evaluator(params, step)
  eval_seconds = time.time() - start
  start = time.time()
  synth, reference, shown = new_figures(config, model, programs, params, builder, mesh,
                                        synth_samplers, evaluator.num_examples,
                                        evaluator.base_key)
  figures_seconds = time.time() - start

  per_sampler = {}
  header = ("| sampler | NFE/example | " + " | ".join(t[0] for t in TARGETS)
            + " | all met |")
  lines = [header, "| --- | --- |" + " --- |" * (len(TARGETS) + 1)]
  for i, (m, n) in enumerate(synth_samplers):
    suffix = "" if i == 0 else f"_{m}_{n}"
    metrics = {k: result.get(k) for k in ("miou_euler_25", "miou_euler_1", "colour_only_miou",
                                          "diversity_real")}
    for k in ("roundtrip_miou", "diversity", "colour_only_miou_synth"):
      metrics[k] = result.get(k + suffix)
    metrics.update(synth[(m, n)])
    if abs(metrics.pop("diversity_here") - metrics["diversity"]) > 1e-5:
      raise AssertionError(f"{m}:{n}: these syntheses are not the evaluator's (diversity "
                           f"{synth[(m, n)]['diversity_here']} here, {metrics['diversity']} there)")
    metrics.update(reference)
    nfe = (sum(flow.network_evaluations(s, sm) for sm, s in seg_samplers)
           + 2 * flow.network_evaluations(n, m)
           + flow.network_evaluations(evaluate.ROUNDTRIP_SAMPLER[1],
                                      evaluate.ROUNDTRIP_SAMPLER[0]))
    metrics["nfe_per_example"] = nfe
    per_sampler[f"{m}:{n}"] = metrics
    cells, ok = row(metrics)
    lines.append(f"| {m} {n} | {nfe} | " + " | ".join(cells) + f" | {'yes' if ok else 'no'} |")
  table = "\n".join(lines)
  print(f"\n{_WORKDIR.value}, checkpoint step {step}, {result['num_examples']} validation "
        f"examples, perturbation {config.model.perturbation} grids "
        f"{tuple(config.model.perturbation_grids)}; evaluator {eval_seconds:.0f} s, new "
        f"figures {figures_seconds:.0f} s; hf_energy_real {reference['hf_energy_real']:.5f}, "
        f"diversity_real_down4 {reference['diversity_real_down4']}\n"
        "(ratios: colour = colour_only_miou_synth / colour_only_miou, diversity = diversity / "
        "diversity_real, hf = hf_energy_synth / hf_energy_real, div_down4 = diversity_down4 / "
        "diversity_real_down4; bold: target missed)\n\n" + table + "\n")
  output = _OUTPUT.value or storage.join(_WORKDIR.value, "eval", f"screen_{step}.json")
  if jax.process_index() == 0:
    storage.write_json(output, {
        "workdir": _WORKDIR.value, "step": step, "perturbation": config.model.perturbation,
        "perturbation_grids": list(config.model.perturbation_grids),
        "seg": _SEG.value, "synth": _SYNTH.value, "eval_seconds": eval_seconds,
        "figures_seconds": figures_seconds, "per_sampler": per_sampler,
        "evaluator": evaluate._strict(result), "table": table})
    logging.info("wrote %s", output)
    if _GRID.value:
      from semflow_jax import images
      stem = output[:-5] if output.endswith(".json") else output
      for (m, n), columns in shown.items():
        images.write_png(f"{stem}_{m}_{n}.png", images.grid(columns))


if __name__ == "__main__":
  app.run(main)
