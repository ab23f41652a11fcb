"""What XLA's FLOP count misses and flops.count adds: loop iterations after the first and the
splash kernels, forward and backward, twice forward under remat."""

import functools

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


def test_per_device_flops_and_mfu():
  counts = flops.Counts(total=3e12, as_xla=1e12)
  cost = flops.per_device({"flops": 2e11, "optimal_seconds": 0.01}, counts, devices=16)
  assert cost["flops"] == pytest.approx(2e11 + 2e12 / 16)
  assert cost["optimal_seconds"] == 0.01
  assert flops.per_device({"flops": 1.0}, counts, 1)["optimal_seconds"] is None  # XLA:CPU
  assert np.isnan(flops.mfu(1e12, 1.0, jax.devices()[0]))  # no peak known for a CPU
  assert flops.PEAK_BF16_TFLOPS == {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}


# The compiled-cost estimate, on programs libtpu's compiler builds for one v5e chip here.

@functools.cache
def _v5e_chip():
  from semflow_jax import plan
  return plan.get_topology("v5e-1").devices[0]


def _compile_for_v5e(fn, *shapes):
  """(compiled, traced, device) of `fn` for one v5e chip (libtpu's compiler on this CPU)."""
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = [_v5e_chip()]
  sharding = NamedSharding(Mesh(np.array(devices), ("x",)), P())
  args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shapes]
  traced = jax.jit(fn).trace(*args)
  return traced.lower().compile(), traced, devices[0]


def _predicted(fn, *shapes):
  compiled, traced, device = _compile_for_v5e(fn, *shapes)
  return (flops.predicted_seconds(compiled, flops.count(traced.jaxpr), 1, device),
          flops.cost_analysis(compiled).get("optimal_seconds"))


A = jax.ShapeDtypeStruct((2048, 2048), jnp.bfloat16)


def test_compiled_cost_is_the_compilers_estimate_where_it_has_one():
  """On loop-free programs the per-instruction cycles at the chip's clock are what libtpu's own
  estimate says (within its copies and overheads), and then its estimate is the prediction."""
  pytest.importorskip("libtpu")
  for depth in (1, 6):
    chain = lambda a, depth=depth: functools.reduce(lambda c, _: c @ a, range(depth), a)
    timing, optimal = _predicted(chain, A)
    assert timing["estimate"] == "compiler" and timing["predicted_seconds"] == optimal > 0
    assert timing["compiler_seconds"] == pytest.approx(optimal, rel=0.3)


def test_compiled_cost_counts_every_loop_iteration_like_the_unrolled_program():
  """libtpu's estimate counts a loop's body once (the same for 10 and 20 iterations); the
  compiled-cost estimate of a scan, a fori_loop and nested loops tracks the unrolled program."""
  pytest.importorskip("libtpu")
  unrolled = lambda n: lambda a: functools.reduce(lambda c, _: c @ a, range(n), a)
  scan = lambda n: lambda a: jax.lax.scan(lambda c, _: (c @ a, None), a, None, length=n)[0]
  fori = lambda n: lambda a: jax.lax.fori_loop(0, n, lambda i, c: c @ a, a)
  nested = lambda a: jax.lax.fori_loop(0, 3, lambda i, c: jax.lax.fori_loop(
      0, 4, lambda j, c: c @ a, c), a)
  a = jax.ShapeDtypeStruct((4096, 4096), jnp.bfloat16)
  _, unrolled_12 = _predicted(unrolled(12), a)
  loop_10, compiler_10 = _predicted(scan(10), a)
  loop_20, compiler_20 = _predicted(scan(20), a)
  assert compiler_10 == pytest.approx(compiler_20)      # the compiler's: the body once
  assert loop_10["estimate"] == "compiled costs" and loop_10["loops"] == 1
  assert loop_20["predicted_seconds"] == pytest.approx(2 * loop_10["predicted_seconds"], rel=0.05)
  # The compiled loop body also copies its carry (a third of a matmul's time at this size),
  # which the unrolled chain does not: a bit dearer, where the compiler's says a tenth.
  per_matmul = unrolled_12 / 12
  assert compiler_10 < 2 * per_matmul
  for timing, n in ((loop_10, 10), (_predicted(fori(10), a)[0], 10), (_predicted(nested, a)[0], 12)):
    assert 0.9 * n * per_matmul <= timing["predicted_seconds"] <= 1.5 * n * per_matmul


def test_splash_kernels_are_estimated_at_the_mxu_peak_where_the_compiler_answers_negative():
  pytest.importorskip("libtpu")
  from jax.sharding import Mesh
  mesh = Mesh(np.array([_v5e_chip()]).reshape(1, 1), ("data", "fsdp"))
  b, t, h, d = 2, 4096, 8, 40  # SD-1.5's 64x64 self-attention, two examples
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  loss = lambda q, k, v: sd_layers.splash_attention(q, k, v, mesh).astype(jnp.float32).sum()
  timing, optimal = _predicted(jax.grad(loss, argnums=(0, 1, 2)), q, q, q)
  # Three kernels (forward, dq, dkv) without a cost: libtpu's estimate is about -3 s.
  assert timing["uncosted_kernels"] == 3 and optimal < 0
  assert timing["estimate"] == "compiled costs"
  # Forward 4, dq 6, dkv 8 b*h*t*t*d, the head dimension padded from 40 to the MXU's 128 lanes.
  analytic = (4 + 6 + 8) * b * h * t * t * 128 / (flops.PEAK_BF16_TFLOPS["v5e"] * 1e12)
  assert timing["kernel_seconds"] == pytest.approx(analytic)
  assert timing["predicted_seconds"] > timing["kernel_seconds"] > 0
