"""Time and memory of SemFlow's train step on the full SD-1.5 UNet and VAE (no weights needed).

  python benchmarks/sd15_train_step.py            # every part below, one process each
  python benchmarks/sd15_train_step.py --part=grad --dtype=bfloat16 --remat --steps=3

The step is the real one, `semflow_jax.step` on `configs/sd15.py`'s model with the run's
optimiser (`state.make_optimizer`): at 8 x --latent_size pixels square (512^2 by default), a
batch of cached image moments (`data.image_latents`) and label maps, the anchor images rendered,
perturbed and encoded by the frozen VAE every step, the rectified-flow loss, gradients of the
UNet, global-norm clipping, AdamW and the EMA. Parts, each in its own process so that its peak
RSS is its own:

- `analyse`: the whole jitted step (`step.lower_train_step`, state donated) compiled from shapes
  alone; XLA's memory analysis (arguments = params + Adam state + EMA + frozen VAE; temp =
  everything else at the peak) and the bytes of activations saved for the backward pass (the
  VJP residuals of `step.make_loss_and_grads`' loss), which is what remat shrinks.
- `grad`: the step's loss and gradients (`step.make_loss_and_grads`), timed, with the process's
  peak RSS.
- `update`: the step's update (`step.make_update`: clipping, AdamW and the EMA of 860M
  parameters), timed (same for every variant).

The full step time is grad + update (the whole step does not fit this machine's memory).
XLA:CPU's default (concurrency-optimised) scheduler runs remat's recomputation early, so remat
saves no memory on CPU with it; run with
`XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false` for the memory-minimising
scheduler, under which remat behaves as on accelerators (benchmarks/RESULTS.md). Weights are
random (the model's initialisation), which does not change the work done; so are the batches.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GIB = 2 ** 30


def _setup(args):
  """(config, model, tx, mesh, abstract state, batch spec) of the benchmarked step."""
  import jax

  from configs import sd15
  from semflow_jax import parallel
  from semflow_jax import state as state_lib
  from semflow_jax import step as step_lib
  from semflow_jax.semflow import SemFlow

  config = sd15.get_config(args.config_arg)
  # The VAE halves the size at every block but the last (8x for SD's).
  config.data.image_size = args.latent_size * 2 ** (
      len(config.model.vae_config.block_out_channels) - 1)
  config.data.image_latents = True
  config.train.batch_size = args.batch
  config.model.dtype = args.dtype
  config.model.remat = args.remat
  mesh = parallel.make_mesh(config, jax.devices()[:1])
  model = SemFlow.from_config(config, mesh)
  tx = state_lib.make_optimizer(config)
  abstract_state = state_lib.abstract(model, tx, config, mesh)
  return config, model, tx, mesh, abstract_state, step_lib.train_batch_spec(model, config)


def _random_batch(batch_spec, mesh, num_classes, seed=1):
  """A global batch of `batch_spec`'s shapes: random moments and labels of the config's classes."""
  import jax

  from semflow_jax import step as step_lib
  rng = np.random.default_rng(seed)
  batch = {}
  for key, (shape, dtype) in batch_spec.items():
    if np.issubdtype(dtype, np.integer):
      batch[key] = rng.integers(0, num_classes, shape).astype(dtype)
    else:
      batch[key] = rng.standard_normal(shape).astype(dtype)
  shardings = {k: v.sharding for k, v in step_lib.abstract_batch(batch_spec, mesh).items()}
  return {k: jax.device_put(v, shardings[k]) for k, v in batch.items()}


def _saved_activation_bytes(fn, *args) -> int:
  """Bytes the backward pass keeps from the forward, not counting the arguments themselves."""
  import contextlib
  import io
  import re

  from jax.ad_checkpoint import print_saved_residuals
  itemsize = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "u8": 1, "s8": 1}
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    print_saved_residuals(fn, *args)
  total = 0
  for line in text.getvalue().splitlines():
    m = re.match(r"(\w+)\[([\d,]*)\] (.*)", line)
    if m and not m.group(3).startswith("from the argument"):
      dims = [int(d) for d in m.group(2).split(",") if d]
      total += itemsize[m.group(1)] * int(np.prod(dims))
  return total


def _timed(fn, steps):
  times = []
  for _ in range(steps):
    start = time.time()
    fn()
    times.append(time.time() - start)
  return [round(x, 2) for x in times], round(statistics.median(times[1:] or times), 2)


def _peak_rss_gib():
  return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB, 2)  # KiB


def run_part(args) -> dict:
  import jax

  from semflow_jax import state as state_lib
  from semflow_jax import step as step_lib
  config, model, tx, mesh, abstract_state, batch_spec = _setup(args)
  result = {"part": args.part, "dtype": args.dtype, "remat": args.remat, "batch": args.batch,
            "latent_size": args.latent_size}
  loss_and_grads = step_lib.make_loss_and_grads(model, config, mesh)
  rng = jax.random.PRNGKey(2)

  if args.part == "analyse":
    start = time.time()
    compiled = step_lib.lower_train_step(model, tx, config, mesh, abstract_state,
                                         batch_spec).compile()
    mem = compiled.memory_analysis()
    abstract_batch = step_lib.abstract_batch(batch_spec, mesh)
    result.update(compile_s=round(time.time() - start, 1),
                  xla_argument_gib=round(mem.argument_size_in_bytes / GIB, 2),
                  xla_temp_gib=round(mem.temp_size_in_bytes / GIB, 2),
                  # The loss that make_loss_and_grads differentiates (one micro-batch).
                  activations_saved_gib=round(_saved_activation_bytes(
                      lambda p, frozen, batch, rng: model.loss({**frozen, **p}, batch, rng),
                      abstract_state.params, abstract_state.frozen, abstract_batch,
                      jax.ShapeDtypeStruct(rng.shape, rng.dtype)) / GIB, 2))
    return result

  state = state_lib.create(model, tx, config, mesh)
  if args.part == "grad":
    batch = _random_batch(batch_spec, mesh, config.data.num_classes)
    start = time.time()
    compiled = jax.jit(loss_and_grads).lower(state.params, state.frozen, batch, rng).compile()
    result["compile_s"] = round(time.time() - start, 1)
    result["step_s"], result["median_s"] = _timed(
        lambda: jax.block_until_ready(compiled(state.params, state.frozen, batch, rng)),
        args.steps)
  elif args.part == "update":
    grads = jax.tree.map(lambda p: jax.random.normal(rng, p.shape, p.dtype) * 0.02, state.params)
    compiled = jax.jit(step_lib.make_update(tx, config), donate_argnums=0).lower(
        state, grads).compile()
    current = [state]

    def one():
      current[0] = jax.block_until_ready(compiled(current[0], grads))

    result["step_s"], result["median_s"] = _timed(one, args.steps)
  result["peak_rss_gib"] = _peak_rss_gib()
  return result


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--part", choices=["analyse", "grad", "update"])
  parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
  parser.add_argument("--remat", action="store_true")
  parser.add_argument("--steps", type=int, default=3,
                      help="timed calls; the first is dropped from the median when there are more")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--latent_size", type=int, default=64)
  parser.add_argument("--config_arg", default="",
                      help="configs/sd15.py's argument: 'tiny' checks this script in seconds")
  args = parser.parse_args()
  if args.part:
    print(json.dumps(run_part(args)), flush=True)
    return
  runs = [("update", "float32", False)] + [
      (part, dtype, remat) for dtype in ("float32", "bfloat16") for remat in (False, True)
      for part in ("analyse", "grad")]
  for part, dtype, remat in runs:
    cmd = [sys.executable, __file__, f"--part={part}", f"--dtype={dtype}",
           f"--steps={args.steps}", f"--batch={args.batch}",
           f"--latent_size={args.latent_size}", f"--config_arg={args.config_arg}"]
    cmd += ["--remat"] if remat else []
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() \
        else json.dumps({"part": part, "dtype": dtype, "remat": remat,
                         "error": f"exit {out.returncode}: {out.stderr.strip()[-300:]}"})
    print(line, flush=True)


if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  main()
