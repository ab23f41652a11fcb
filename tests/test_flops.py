"""What XLA's FLOP count misses and flops.count adds: loop iterations after the first and the
splash kernels, forward and backward, twice forward under remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax import flops
from semflow_jax.models import sd_layers


def test_loops_count_every_iteration_where_xla_counts_one():
  x = jnp.ones((8, 16))
  w = jnp.ones((16, 16))
  once = 2 * 8 * 16 * 16

  def scanned(x):
    return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

  def fori(x):
    return jax.lax.fori_loop(0, 3, lambda i, c: c @ w, x)

  counts = flops.count(jax.make_jaxpr(scanned)(x))
  assert (counts.total, counts.as_xla) == (5 * once, once)
  counts = flops.count(jax.make_jaxpr(fori)(x))
  assert (counts.total, counts.as_xla) == (3 * once, once)
  # And XLA counts the body once indeed (its count of the compiled loop is one matmul's).
  xla = flops.cost_analysis(jax.jit(scanned).lower(x).compile())["flops"]
  assert xla == pytest.approx(once, rel=0.01)


def test_convolutions_and_conditionals():
  x = jnp.ones((2, 8, 8, 3))
  k = jnp.ones((3, 3, 3, 5))
  conv = lambda x: jax.lax.conv_general_dilated(x, k, (1, 1), "SAME",
                                                dimension_numbers=("NHWC", "HWIO", "NHWC"))
  assert flops.count(jax.make_jaxpr(conv)(x)).total == 2 * (2 * 8 * 8 * 5) * (3 * 3 * 3)
  w = jnp.ones((4, 4))
  branch = lambda p, y: jax.lax.cond(p, lambda y: y @ w @ w, lambda y: y, y)
  assert flops.count(jax.make_jaxpr(branch)(True, jnp.ones((4, 4)))).total == 2 * (2 * 4 ** 3)


@pytest.mark.parametrize("remat", [False, True])
def test_splash_kernels_forward_backward_and_remat(remat):
  b, t, h, d = 2, 256, 2, 64
  q = jnp.ones((b, t, h, d), jnp.bfloat16)
  attention = lambda q: sd_layers.splash_attention(q, q, q).astype(jnp.float32).sum()
  if remat:
    attention = jax.checkpoint(attention)
  unit = b * h * t * t * d
  forward = flops.count(jax.make_jaxpr(attention)(q))
  assert (forward.total, forward.as_xla) == (4 * unit, 0)   # q k^T and p v; XLA sees none
  both = flops.count(jax.make_jaxpr(jax.grad(attention))(q)).total
  # Backward: the dq kernel (logits, dp, dq: 6) and the dkv kernel (logits, dp, dv, dk: 8);
  # remat runs the forward kernel a second time. Outside the kernels, the backward's row sums
  # of dO * O (b*t*h*d multiply-adds) are one small dot.
  assert both == (4 * (2 if remat else 1) + 6 + 8) * unit + 2 * b * t * h * d


def test_per_device_prediction_and_mfu():
  counts = flops.Counts(total=3e12, as_xla=1e12)
  cost = flops.per_device({"flops": 2e11, "optimal_seconds": 0.01}, counts, devices=16)
  assert cost["flops"] == pytest.approx(2e11 + 2e12 / 16)
  assert cost["predicted_seconds"] == pytest.approx(0.01 * cost["flops"] / 2e11)
  assert flops.per_device({"flops": 1.0}, counts, 1)["predicted_seconds"] is None  # XLA:CPU
  assert np.isnan(flops.mfu(1e12, 1.0, jax.devices()[0]))  # no peak known for a CPU
  assert flops.PEAK_BF16_TFLOPS == {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}
