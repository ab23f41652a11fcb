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
   The same evaluation reports the two figures issue #23 added (semflow_jax/evaluators:
   hf_energy, diversity_down4): the syntheses' high-frequency energy against the real images'
   (target: synth / real within [0.8, 1.25]) and the diversity of 4x-downsampled syntheses
   against the real renderings' (target: >= 0.45 x the real one).

Prints one markdown row per synthesis sampler with every target's figure and writes everything
to --output (default `<workdir>/eval/screen_<step>.json`).
"""

import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from semflow_jax import evaluate, flow, parallel, state, storage
from semflow_jax import metrics as metrics_lib
from semflow_jax.evaluators import roundtrip
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


def parse(samplers) -> list:
  out = []
  for s in samplers:
    method, _, steps = s.partition(":")
    flow.check_sampler(int(steps), method)
    out.append((method, int(steps)))
  return out


def row(metrics: dict) -> tuple:
  """(cells, all met) for one sampler's metrics."""
  cells, ok = [], True
  for _name, figure, test in TARGETS:
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
    for k in ("hf_energy_synth", "diversity_down4"):
      metrics[k] = result.get(k + suffix)
    for k in ("hf_energy_real", "diversity_real_down4"):
      metrics[k] = result.get(k)
    nfe = (sum(flow.network_evaluations(s, sm) for sm, s in seg_samplers)
           + 2 * flow.network_evaluations(n, m)
           + flow.network_evaluations(roundtrip.SAMPLER[1], roundtrip.SAMPLER[0]))
    metrics["nfe_per_example"] = nfe
    per_sampler[f"{m}:{n}"] = metrics
    cells, ok = row(metrics)
    lines.append(f"| {m} {n} | {nfe} | " + " | ".join(cells) + f" | {'yes' if ok else 'no'} |")
  table = "\n".join(lines)
  print(f"\n{_WORKDIR.value}, checkpoint step {step}, {result['num_examples']} validation "
        f"examples, perturbation {config.model.perturbation} grids "
        f"{tuple(config.model.perturbation_grids)}; evaluator {eval_seconds:.0f} s; "
        f"hf_energy_real {result.get('hf_energy_real')}, diversity_real_down4 "
        f"{result.get('diversity_real_down4')}\n"
        "(ratios: colour = colour_only_miou_synth / colour_only_miou, diversity = diversity / "
        "diversity_real, hf = hf_energy_synth / hf_energy_real, div_down4 = diversity_down4 / "
        "diversity_real_down4; bold: target missed)\n\n" + table + "\n")
  output = _OUTPUT.value or storage.join(_WORKDIR.value, "eval", f"screen_{step}.json")
  if jax.process_index() == 0:
    storage.write_json(output, {
        "workdir": _WORKDIR.value, "step": step, "perturbation": config.model.perturbation,
        "perturbation_grids": list(config.model.perturbation_grids),
        "seg": _SEG.value, "synth": _SYNTH.value, "eval_seconds": eval_seconds,
        "per_sampler": per_sampler,
        "evaluator": metrics_lib.plain(result), "table": table})
    logging.info("wrote %s", output)

if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  app.run(main)
