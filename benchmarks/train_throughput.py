"""Train-step throughput of SemFlow configs, measured side by side in one process.

  python benchmarks/train_throughput.py                        # default config vs variants
  python benchmarks/train_throughput.py --steps=20 --batch_size=32

Each variant is the default config with some keys overridden; it compiles the real train step
(`semflow_jax.step`: loss, grads, AdamW, state donated) on the config's mesh and times `--steps`
steps after compilation, with synthetic uint8 batches (the input pipeline is not part of this
measurement).
"""

import argparse
import time

import jax
import numpy as np

from configs import synthetic
from semflow_jax import parallel, state as state_lib, step as step_lib
from semflow_jax.semflow import SemFlow

VARIANTS = {
    "default": {},
    "no_patch(base32,mult122)": {"model.patch_size": 1, "model.base_channels": 32,
                                 "model.channel_mult": (1, 2, 2), "model.attention_resolutions": (8,)},
}


def measure(overrides: dict, batch_size: int, steps: int) -> dict:
  config = synthetic.get_config()
  config.train.batch_size = batch_size
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  mesh = parallel.make_mesh(config)
  model = SemFlow.from_config(config, mesh)
  tx = state_lib.make_optimizer(config)
  state = state_lib.create(model, tx, config, mesh)
  rng = np.random.default_rng(0)
  size = config.data.image_size
  batch = parallel.to_global(
      {"image": rng.integers(0, 256, (batch_size, size, size, 3), dtype=np.uint8),
       "label": rng.integers(0, config.data.num_classes, (batch_size, size, size, 1),
                             dtype=np.uint8)}, mesh)
  start = time.perf_counter()
  step, _ = step_lib.compile_train_step(model, tx, config, mesh,
                                        state_lib.abstract(model, tx, config, mesh),
                                        step_lib.train_batch_spec(model, config))
  state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  compile_s = time.perf_counter() - start
  start = time.perf_counter()
  for _ in range(steps):
    state, metrics = step(state, batch)
  jax.block_until_ready(metrics)
  seconds = (time.perf_counter() - start) / steps
  return {"params": sum(x.size for x in jax.tree.leaves(state.params)),
          "ms_per_step": 1000 * seconds, "examples_per_s": batch_size / seconds,
          "compile_s": compile_s}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--steps", type=int, default=20)
  args = parser.parse_args()
  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, batch {args.batch_size}, "
        f"{args.steps} timed steps")
  results = {}
  for name, overrides in VARIANTS.items():
    results[name] = r = measure(overrides, args.batch_size, args.steps)
    print(f"{name:28s} {r['params'] / 1e6:6.2f}M params  {r['ms_per_step']:8.1f} ms/step  "
          f"{r['examples_per_s']:7.1f} examples/s  (compile {r['compile_s']:.1f} s)", flush=True)
  base = results["default"]["examples_per_s"]
  for name, r in results.items():
    print(f"throughput ratio default / {name}: {base / r['examples_per_s']:.2f}")


if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  main()
