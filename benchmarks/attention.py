"""einsum vs jax.nn.dot_product_attention on this machine's backend, side by side.

  JAX_PLATFORMS=cpu python benchmarks/attention.py

Forward + backward (value_and_grad of the sum) of `sd_layers.einsum_attention` and
`sd_layers.dot_product_attention` at SD-1.5 layer shapes with 1/4 of the tokens (batch 2), in
float32 and bfloat16; best of 3 after a warm-up. Decides what `config.model.attention='auto'`
uses on a CPU.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp

from semflow_jax.models import sd_layers as L

# (queries, keys, heads, head dim): SD-1.5 self-attention at 32^2 / 16^2 latents, the
# cross-attention over 77 text tokens, the VAE's one-head mid-block attention.
SHAPES = [(1024, 1024, 8, 40), (256, 256, 8, 80), (1024, 77, 8, 40), (1024, 1024, 1, 512)]


def best_of(fn, *args, repeats=3):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return min(times)


def main():
  platform = jax.default_backend()
  print(f"JAX {jax.__version__} on {platform}\n")
  print("| queries x keys | heads x dim | dtype | einsum ms | dot_product ms | dot_product / einsum |")
  print("| --- | --- | --- | --- | --- | --- |")
  for q_len, kv_len, heads, dim in SHAPES:
    for dtype in (jnp.float32, jnp.bfloat16):
      kq, kk, kv = jax.random.split(jax.random.PRNGKey(0), 3)
      q = jax.random.normal(kq, (2, q_len, heads, dim), dtype)
      k = jax.random.normal(kk, (2, kv_len, heads, dim), dtype)
      v = jax.random.normal(kv, (2, kv_len, heads, dim), dtype)
      timed = {}
      for name, fn in (("einsum", L.einsum_attention),
                       ("dot_product", lambda q, k, v: L.dot_product_attention(q, k, v, platform))):
        step = jax.jit(jax.value_and_grad(lambda q, k, v, fn=fn: fn(q, k, v).astype(
            jnp.float32).sum(), argnums=(0, 1, 2)))
        timed[name] = best_of(step, q, k, v)
      print(f"| {q_len}x{kv_len} | {heads}x{dim} | {jnp.dtype(dtype).name} | "
            f"{timed['einsum'] * 1e3:.1f} | {timed['dot_product'] * 1e3:.1f} | "
            f"{timed['dot_product'] / timed['einsum']:.2f} |", flush=True)


if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  main()
