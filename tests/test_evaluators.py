"""The sums over processes that metric evaluators use (semflow_jax/evaluators/common.py):
exact for integers, order-independent fixed point for floats, bit-exact for per-example values.
Several processes are simulated here by summing their encodings; the collective itself runs for
real in the two-process evaluation of tests/test_evaluate.py."""

import fractions

import numpy as np
import pytest

from semflow_jax.evaluators import common


def test_int64_sums_through_16_bit_limbs_are_exact_with_negatives_and_large_values():
  rng = np.random.default_rng(0)
  processes = [rng.integers(-2**60, 2**60, size=(5, 3), dtype=np.int64) for _ in range(4)]
  processes[0][0, 0] = -1  # all 64 bits set
  limb_sums = sum(common.to_limbs(x).astype(np.uint64) for x in processes)
  assert limb_sums.max() < 2**32  # what a uint32 collective can hold  # pyright: ignore[reportAttributeAccessIssue]
  expected = [[sum(int(x[i, j]) for x in processes) for j in range(3)] for i in range(5)]
  assert common.from_limbs(limb_sums.astype(np.uint32)).tolist() == expected  # pyright: ignore[reportAttributeAccessIssue]


def test_float_sums_in_fixed_point_are_within_the_stated_bound_and_order_free():
  rng = np.random.default_rng(1)
  count = 8
  processes = [rng.normal(size=50) * 10.0 ** rng.integers(-3, 4, size=50) for _ in range(count)]
  processes[3][7] = 0.0
  exponent = max(common.largest_exponent(x) for x in processes)
  scale = common.fixed_point_scale(exponent, count)

  def fixed_sum(xs):
    return sum(np.rint(np.ldexp(x, scale)).astype(np.int64) for x in xs)
  total = fixed_sum(processes)
  assert np.array_equal(total, fixed_sum(processes[::-1]))  # integers: any order, same sum
  got = np.ldexp(total.astype(np.float64), -scale)  # pyright: ignore[reportAttributeAccessIssue]
  exact = np.array([float(sum(fractions.Fraction(float(x[i])) for x in processes))
                    for i in range(50)])
  bound = count**2 * 2.0**-63 * 2.0**exponent  # the docstring's bound, beyond float64 rounding
  assert np.all(np.abs(got - exact) <= bound + np.spacing(np.abs(exact)))
  assert np.max(np.abs(got - exact)) < 2.0**-50 * np.max(np.abs(exact))
  # No overflow at the largest magnitude: |value| < 2^exponent fits with room for the sum.
  assert np.abs(total).max() < 2**62


def test_one_process_sums_to_its_own_values_and_per_example_values_bit_for_bit():
  x = np.array([0.1, -3.5e-300, 7e300, np.pi])
  np.testing.assert_array_equal(common.combine_disjoint(x), x)  # bit for bit, any magnitude
  np.testing.assert_array_equal(common.sum_over_processes(np.array([3, -4])), [3, -4])
  assert common.sum_over_processes(np.array([1.5], np.float32)).dtype == np.float64


@pytest.mark.parametrize("op", ["sum", "max"])
def test_the_collective_over_a_process_mesh_of_eight_devices(op):
  # One process: the collective over a (1 process, 8 devices) mesh is the identity, which checks
  # the layout (each device holds an eighth; the result is read back in order and unpadded).
  words = np.arange(37, dtype=np.uint32) * 11 if op == "sum" else np.array([-7], np.int32)
  np.testing.assert_array_equal(common._over_processes(words, op), words)


def test_unknown_metric_names_say_what_exists():
  with pytest.raises(ValueError, match=r"no metric evaluator 'mIoU'.*'miou'"):
    common.load("mIoU")
  with pytest.raises(ValueError, match="no metric evaluator 'common'"):
    common.load("common")
  assert {"miou", "roundtrip", "diversity", "colour_only", "fid", "lpips", "hf_energy",
          "diversity_down4"} <= set(common.names())
