"""Palette x perturbation ablation on the default config, plus its seeds; one command.

  python benchmarks/palette_ablation.py --root=runs/palette_ablation

Trains and evaluates, one after the other, the default config (configs/synthetic.py) with
  - config.model.palette in (paper, spread) x config.model.perturbation in --fractions
    (fractions of half the anchor spacing; 0 = no perturbation), seed 0;
  - the default config itself (its palette and perturbation) with config.seed in --seeds;
every other key as in the default config (plus --set overrides, e.g. --set=train.num_steps=1500
for a shorter screen). Each run is `python -m semflow_jax.main` in <root>/<name>; a run whose
metrics file exists is not repeated, so an interrupted ablation continues where it stopped.
Writes <root>/ablation.md: every metric of each run's eval JSON, and the seeds' mean and
standard deviation; paste it into benchmarks/RESULTS.md.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import synthetic  # noqa: E402

METRICS = ("miou_euler_1", "miou_euler_25", "roundtrip_miou", "colour_only_miou",
           "colour_only_miou_synth", "diversity", "diversity_real")
RATIOS = (("colour synth / real", "colour_only_miou_synth", "colour_only_miou"),
          ("diversity / real", "diversity", "diversity_real"))


def _runs(args):
  """(name, overrides) for every run of the ablation, in the order they are trained."""
  runs = []
  for palette in ("paper", "spread"):
    for fraction in args.fractions:
      runs.append((f"{palette}_p{fraction:g}", {"model.palette": palette,
                                                 "model.perturbation": fraction, "seed": 0}))
  for seed in args.seeds:
    runs.append((f"default_seed{seed}", {"seed": seed}))
  return runs


def _metrics_path(workdir, num_steps):
  return os.path.join(workdir, "eval", f"metrics_{num_steps}.json")


def _train(name, overrides, args, num_steps):
  workdir = os.path.join(args.root, name)
  path = _metrics_path(workdir, num_steps)
  if os.path.exists(path):
    print(f"{name}: done before ({path})", flush=True)
  else:
    flags = [f"--config.{k}={v}" for k, v in {**overrides, **dict(args.set)}.items()]
    command = [sys.executable, "-m", "semflow_jax.main", "--config=configs/synthetic.py",
               f"--workdir={workdir}", *flags]
    print(f"{name}: {' '.join(command[1:])}", flush=True)
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(args.root, f"{name}.log"), "w") as log:
      subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=True)
  with open(path) as f:
    return json.load(f)


def _row(cells):
  return "| " + " | ".join(cells) + " |"


def _table(results, per_class_key):
  header = ["run", *METRICS, *(r[0] for r in RATIOS), per_class_key, "eval s"]
  lines = [_row(header), _row(["---"] * len(header))]
  for name, m in results:
    cells = [name] + [f"{m[k]:.3f}" for k in METRICS]
    cells += [f"{m[a] / m[b]:.2f}" for _, a, b in RATIOS]
    cells += [" ".join(f"{v:.2f}" for v in m[per_class_key]), f"{m['eval_seconds']:.0f}"]
    lines.append(_row(cells))
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--root", default="runs/palette_ablation")
  parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.1, 0.25, 0.5])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  parser.add_argument("--set", type=lambda s: tuple(s.split("=", 1)), action="append",
                      default=[], help="KEY=VALUE override for every run, e.g. train.num_steps=1500")
  args = parser.parse_args()
  args.root = os.path.abspath(args.root)
  config = synthetic.get_config()
  num_steps = int(dict(args.set).get("train.num_steps", config.train.num_steps))
  per_class_key = f"per_class_iou_{config.eval.method}_{max(config.eval.seg_steps)}"

  results = [(name, _train(name, overrides, args, num_steps)) for name, overrides in _runs(args)]
  grid = [r for r in results if not r[0].startswith("default_seed")]
  seeds = [r for r in results if r[0].startswith("default_seed")]
  m = config.model
  lines = [f"Default config with overrides, {num_steps} steps; "
           f"default: palette={m.palette}, perturbation={m.perturbation}, "
           f"perturbation_grids={tuple(m.perturbation_grids)}"
           + (f"; every run: {' '.join(f'{k}={v}' for k, v in args.set)}" if args.set else ""),
           "", *_table(grid, per_class_key), "", "Default config, training seeds:", "",
           *_table(seeds, per_class_key)]
  keys = [*METRICS, *RATIOS]
  values = {k if isinstance(k, str) else k[0]: np.array(
      [r[k] if isinstance(k, str) else r[k[1]] / r[k[2]] for _, r in seeds]) for k in keys}
  lines += ["", _row(["seeds", *values]), _row(["---"] * (len(values) + 1)),
            _row(["mean +- std", *(f"{v.mean():.3f} +- {v.std(ddof=1) if len(v) > 1 else 0:.3f}"
                                   for v in values.values())])]
  text = "\n".join(lines) + "\n"
  with open(os.path.join(args.root, "ablation.md"), "w") as f:
    f.write(text)
  print(text)


if __name__ == "__main__":
  main()
