"""Quality against sampling cost, as the SemFlow paper tabulates it, for a trained workdir.

  python benchmarks/steps_quality.py --workdir=runs/synthetic
  python benchmarks/steps_quality.py --config=configs/coco_stuff.py --workdir=gs://b/coco \
      --num_examples=1000

Pass the config the run was trained with (default: configs/synthetic.py, the README main job).
One evaluation (the protocol of semflow_jax/evaluate.py) with every sampler at once:
- segmentation mIoU with Euler at 1, 2, 5, 10, 25, 50 steps;
- Euler, Heun and RK4 at equal network (UNet) evaluations, NFE 4, 8, 20, 40 (Heun makes 2 per
  step, RK4 4), for segmentation and for synthesis;
- synthesis quality at the same budgets: round-trip mIoU, diversity, the colour-only mIoU of the
  syntheses, and FID / LPIPS where the config names the converted networks.
Prints the markdown tables (for benchmarks/RESULTS.md) and writes them with every number to
`<workdir>/eval/steps_quality_<step>.json` (or --output).
"""

import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from semflow_jax import evaluate, flow, parallel, state, storage
from semflow_jax.data import pipeline
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py",
                                          "The config the run was trained with.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The trained run (its latest checkpoint).")
_NUM_EXAMPLES = flags.DEFINE_integer("num_examples", -1, "Validation examples; -1: all.")
_OUTPUT = flags.DEFINE_string("output", None, "JSON to write (default in the workdir's eval/).")
flags.mark_flags_as_required(["workdir"])

EULER_STEPS = (1, 2, 5, 10, 25, 50)
BUDGETS = (4, 8, 20, 40)  # network evaluations per image; each divisible by 1, 2 and 4
METHODS = ("euler", "heun", "rk4")
SYNTH_METRICS = ("roundtrip_miou", "diversity", "colour_only_miou_synth", "fid",
                 "lpips_diversity", "lpips_to_real")


def samplers() -> list:
  """(method, steps): Euler at the paper's step counts, then every method at each budget."""
  out = [("euler", n) for n in EULER_STEPS]
  for budget in BUDGETS:
    for method in METHODS:
      s = (method, budget // flow.EVALUATIONS_PER_STEP[method])
      if s not in out:
        out.append(s)
  return out


def _fmt(value) -> str:
  return "-" if value is None else f"{value:.3f}"


def tables(result: dict, synth_samplers: list) -> str:
  """The three markdown tables of one evaluation."""
  lines = ["Segmentation mIoU, Euler:", "",
           "| steps | " + " | ".join(str(n) for n in EULER_STEPS) + " |",
           "| --- |" + " --- |" * len(EULER_STEPS),
           "| mIoU | " + " | ".join(_fmt(result[f"miou_euler_{n}"]) for n in EULER_STEPS) + " |",
           "", "Segmentation mIoU at equal network evaluations (steps in brackets):", "",
           "| NFE | " + " | ".join(METHODS) + " |", "| --- |" + " --- |" * len(METHODS)]
  for budget in BUDGETS:
    cells = []
    for m in METHODS:
      n = budget // flow.EVALUATIONS_PER_STEP[m]
      cells.append(f"{_fmt(result[f'miou_{m}_{n}'])} ({n})")
    lines.append(f"| {budget} | " + " | ".join(cells) + " |")
  shown = [k for k in SYNTH_METRICS if any(result.get(_synth_key(k, synth_samplers, s))
                                           is not None for s in synth_samplers)]
  lines += ["", "Synthesis at the same budgets (round trip: segmented with one Euler step):", "",
            "| sampler | steps | NFE | " + " | ".join(shown) + " |",
            "| --- | --- | --- |" + " --- |" * len(shown)]
  for s in sorted(synth_samplers, key=lambda s: (flow.network_evaluations(s[1], s[0]),
                                                 METHODS.index(s[0]))):
    cells = [_fmt(result.get(_synth_key(k, synth_samplers, s))) for k in shown]
    lines.append(f"| {s[0]} | {s[1]} | {flow.network_evaluations(s[1], s[0])} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines)


def _synth_key(metric: str, synth_samplers: list, sampler) -> str:
  # The Evaluator names the first synthesis sampler's metrics plainly, the others with a suffix.
  return metric if sampler == synth_samplers[0] else f"{metric}_{sampler[0]}_{sampler[1]}"


def main(argv):
  del argv
  config = _CONFIG.value
  if _NUM_EXAMPLES.value > 0:
    config.eval.num_examples = _NUM_EXAMPLES.value
  mesh = parallel.make_mesh(config)
  model = SemFlow.from_config(config)
  params, step = state.load_params(config, _WORKDIR.value, mesh)
  builder = pipeline.get_builder(config.data)
  chosen = samplers()
  evaluator = evaluate.Evaluator(config, model, Programs(model), builder, mesh,
                                 seg_samplers=chosen, synth_samplers=chosen)
  start = time.time()
  result = evaluator(params, step)
  seconds = time.time() - start
  text = tables(result, chosen)
  print(f"\n{_WORKDIR.value}, checkpoint step {step}, {result['num_examples']} validation "
        f"examples, {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{seconds:.0f} s\n\n{text}\n")
  output = _OUTPUT.value or storage.join(_WORKDIR.value, "eval", f"steps_quality_{step}.json")
  if jax.process_index() == 0:
    storage.write_json(output, {"step": step, "samplers": chosen, "seconds": seconds,
                                "metrics": result, "tables": text})
    logging.info("wrote %s", output)


if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  app.run(main)
