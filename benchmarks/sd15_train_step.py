"""Time and memory of a SemFlow train step of the full SD-1.5 UNet (no weights needed).

  python benchmarks/sd15_train_step.py            # every part below, one process each
  python benchmarks/sd15_train_step.py --part=grad --dtype=bfloat16 --remat --steps=3

The step is the real one: rectified-flow loss on 64x64x4 latents (the 512^2 case) with a
77-token context, gradients, global-norm clipping and AdamW. Parts, each in its own process
so that its peak RSS is its own:

- `analyse`: the whole jitted step (state donated) compiled from shapes alone; XLA's memory
  analysis (arguments = params + Adam state; temp = everything else at the peak) and the bytes of
  activations saved for the backward pass (the VJP residuals), which is what remat shrinks.
- `grad`: loss and gradients (forward + backward), timed, with the process's peak RSS.
- `update`: gradient clipping + AdamW update of 860M parameters, timed (same for every variant).

The full step time is grad + update. XLA:CPU's default (concurrency-optimised) scheduler runs
remat's recomputation early, so remat saves no memory on CPU with it; run with
`XLA_FLAGS=--xla_cpu_enable_concurrency_optimized_scheduler=false` for the memory-minimising
scheduler, under which remat behaves as on accelerators (benchmarks/RESULTS.md). Weights are random (N(0, 0.02)), which does not change the
work done. Latents are random too: the frozen VAE is not part of the UNet step.
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
  import jax
  import jax.numpy as jnp
  import optax

  from configs import sd15
  from semflow_jax import flow
  from semflow_jax.models import sd_unet

  dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
  unet = sd_unet.SDUNet(sd_unet.SDUNetConfig.from_diffusers(sd15.UNET), dtype=dtype,
                        remat=args.remat)
  b, size = args.batch, args.latent_size
  z_shape = (b, size, size, 4)
  context = jnp.zeros((b, sd15.CONTEXT_TOKENS, 768), jnp.float32)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-5))
  abstract_params = jax.eval_shape(
      lambda: unet.init(jax.random.PRNGKey(0), jnp.zeros(z_shape), jnp.zeros((b,)),
                        context)["params"])

  def loss_fn(params, z0, z1, t):
    v = unet.apply({"params": params}, flow.interpolate(z0, z1, t), 1000.0 * t, context)
    return jnp.mean(jnp.square(v - flow.velocity_target(z0, z1)))

  keys = jax.random.split(jax.random.PRNGKey(1), 3)
  batch = (jax.random.normal(keys[0], z_shape), jax.random.normal(keys[1], z_shape),
           jax.random.uniform(keys[2], (b,)))
  return tx, abstract_params, loss_fn, batch


def _saved_activation_bytes(fn, params) -> int:
  """Bytes the backward pass keeps from the forward, not counting the parameters themselves."""
  import contextlib
  import io
  import re

  from jax.ad_checkpoint import print_saved_residuals
  itemsize = {"f32": 4, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "pred": 1, "u8": 1, "s8": 1}
  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    print_saved_residuals(fn, params)
  total = 0
  for line in text.getvalue().splitlines():
    m = re.match(r"(\w+)\[([\d,]*)\] (.*)", line)
    if m and not m.group(3).startswith("from the argument"):
      dims = [int(d) for d in m.group(2).split(",") if d]
      total += itemsize[m.group(1)] * int(np.prod(dims))
  return total


def _random_tree(abstract, seed=0):
  import jax
  import numpy as np
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: jax.device_put(
      (rng.standard_normal(s.shape, dtype=np.float32) * 0.02)), abstract)


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
  import optax
  tx, abstract_params, loss_fn, batch = _setup(args)
  result = {"part": args.part, "dtype": args.dtype, "remat": args.remat, "batch": args.batch,
            "latent_size": args.latent_size}

  if args.part == "analyse":
    def step(state, z0, z1, t):
      params, opt_state = state
      loss, grads = jax.value_and_grad(loss_fn)(params, z0, z1, t)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    state = (abstract_params, jax.eval_shape(tx.init, abstract_params))
    start = time.time()
    compiled = jax.jit(step, donate_argnums=0).lower(state, *batch).compile()
    mem = compiled.memory_analysis()
    result.update(compile_s=round(time.time() - start, 1),
                  xla_argument_gib=round(mem.argument_size_in_bytes / GIB, 2),
                  xla_temp_gib=round(mem.temp_size_in_bytes / GIB, 2),
                  activations_saved_gib=round(_saved_activation_bytes(
                      lambda p: loss_fn(p, *batch), abstract_params) / GIB, 2))
    return result

  params = _random_tree(abstract_params)
  if args.part == "grad":
    grad_fn = jax.jit(jax.value_and_grad(loss_fn))
    start = time.time()
    compiled = grad_fn.lower(params, *batch).compile()
    result["compile_s"] = round(time.time() - start, 1)
    result["step_s"], result["median_s"] = _timed(
        lambda: jax.block_until_ready(compiled(params, *batch)), args.steps)
  elif args.part == "update":
    grads = _random_tree(abstract_params, seed=1)
    opt_state = tx.init(params)

    def update(params, opt_state, grads):
      updates, opt_state = tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state

    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(params, opt_state, grads).compile()
    state = [params, opt_state]

    def one():
      state[0], state[1] = jax.block_until_ready(compiled(state[0], state[1], grads))

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
           f"--latent_size={args.latent_size}"] + (["--remat"] if remat else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() \
        else json.dumps({"part": part, "dtype": dtype, "remat": remat,
                         "error": f"exit {out.returncode}: {out.stderr.strip()[-300:]}"})
    print(line, flush=True)


if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  main()
