"""Per-chip memory of one SD-1.5 attention layer (forward + backward), compiled for TPU v5e.

  python benchmarks/attention_memory_tpu.py      # needs libtpu (requirements-tpu.lock), no TPU

libtpu compiles, on this CPU, the gradient of each attention kernel for a v5e 2x2 slice with 2
examples per chip in bfloat16, and XLA's memory analysis gives the temporaries per chip (the
materialised logits and softmax for einsum / dot_product, the kernel's blocks for splash)
and its FLOP count (Pallas kernels are not counted).
"""

import os
import sys
import time

os.environ["JAX_PLATFORMS"] = "cpu"
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # compiling only: no chip to lock
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from semflow_jax.models import sd_layers as L

# (name, queries, keys, heads, head dim)
LAYERS = [("UNet self 64^2", 4096, 4096, 8, 40), ("UNet self 32^2", 1024, 1024, 8, 80),
          ("UNet cross 64^2", 4096, 77, 8, 40), ("VAE mid 64^2", 4096, 4096, 1, 512)]


def main():
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = Mesh(np.asarray(devices), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  kernels = {"einsum": L.einsum_attention,
             "dot_product": lambda q, k, v: L.dot_product_attention(q, k, v, "tpu"),
             "splash": lambda q, k, v: L.splash_attention(q, k, v, mesh)}
  print("| layer | kernel | temp MiB/chip | XLA GFLOP/chip | compile s |")
  print("| --- | --- | --- | --- | --- |")
  for name, q_len, kv_len, heads, dim in LAYERS:
    for kernel, fn in kernels.items():
      if kernel == "splash" and kv_len % L.SPLASH_BLOCK:
        continue
      shape = lambda n: jax.ShapeDtypeStruct((8, n, heads, dim), jnp.bfloat16, sharding=sharding)  # noqa: B023  (called within the iteration)
      loss = lambda q, k, v, fn=fn: fn(q, k, v).astype(jnp.float32).sum()
      start = time.time()
      compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
          shape(q_len), shape(kv_len), shape(kv_len)).compile()
      cost = compiled.cost_analysis() or {}
      print(f"| {name} ({q_len}x{kv_len}, {heads}x{dim}) | {kernel} | "
            f"{compiled.memory_analysis().temp_size_in_bytes / 2**20:.0f} | "
            f"{cost.get('flops', 0) / 1e9:.1f} | {time.time() - start:.0f} |", flush=True)


if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  main()
