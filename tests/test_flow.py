import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax import flow


def test_interpolation_endpoints_and_per_example_times():
  z0, z1 = jnp.zeros((3, 2, 2, 1)), jnp.ones((3, 2, 2, 1))
  np.testing.assert_allclose(flow.interpolate(z0, z1, 0.0), z0)
  np.testing.assert_allclose(flow.interpolate(z0, z1, 1.0), z1)
  zt = flow.interpolate(z0, z1, jnp.array([0.0, 0.25, 1.0]))
  np.testing.assert_allclose(zt[:, 0, 0, 0], [0.0, 0.25, 1.0])


def test_loss_is_zero_for_the_straight_path_velocity_and_mse_otherwise():
  k0, k1 = jax.random.split(jax.random.PRNGKey(0))
  z0, z1 = jax.random.normal(k0, (4, 8)), jax.random.normal(k1, (4, 8))
  assert float(flow.flow_matching_loss(z1 - z0, z0, z1)) == 0.0
  np.testing.assert_allclose(flow.flow_matching_loss(z1 - z0 + 0.5, z0, z1), 0.25, rtol=1e-6)
  # Per-example weights (the padding mask): a weighted mean of the examples' own means.
  v = z1 - z0 + jnp.arange(4.0)[:, None]
  np.testing.assert_allclose(flow.flow_matching_loss(v, z0, z1, jnp.array([1.0, 0.0, 1.0, 0.0])),
                             (0.0 + 4.0) / 2, rtol=1e-6)
  assert float(flow.flow_matching_loss(v, z0, z1, jnp.zeros(4))) == 0.0


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_constant_field_is_exact_in_one_step_both_directions(method):
  c = jnp.array([1.5, -2.0, 0.25])
  z = jnp.array([0.1, 0.2, 0.3])
  forward = flow.integrate(lambda z, t: jnp.broadcast_to(c, z.shape), z, 0.0, 1.0, 1, method)
  np.testing.assert_allclose(forward, z + c, rtol=1e-6)
  backward = flow.integrate(lambda z, t: jnp.broadcast_to(c, z.shape), forward, 1.0, 0.0, 1, method)
  np.testing.assert_allclose(backward, z, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("steps", [1, 4, 25])
def test_linear_ode_matches_closed_forms_of_euler_and_heun(steps):
  a, x0 = -1.3, jnp.array([2.0, -0.5])
  h = 1.0 / steps
  euler = flow.integrate(lambda x, t: a * x, x0, 0.0, 1.0, steps, "euler")
  heun = flow.integrate(lambda x, t: a * x, x0, 0.0, 1.0, steps, "heun")
  np.testing.assert_allclose(euler, x0 * (1 + a * h) ** steps, rtol=1e-5)
  np.testing.assert_allclose(heun, x0 * (1 + a * h + (a * h) ** 2 / 2) ** steps, rtol=1e-5)
  # Both converge to exp(a); Heun (second order) is much closer than Euler.
  exact = x0 * np.exp(a)
  assert np.abs(heun - exact).max() < np.abs(euler - exact).max()


def test_time_dependent_field_uses_the_right_times():
  # dx/dt = t: Heun (trapezoid) is exact for fields linear in t; Euler is a left Riemann sum.
  field = lambda x, t: jnp.full_like(x, t)
  x0 = jnp.zeros(1)
  np.testing.assert_allclose(flow.integrate(field, x0, 0.0, 1.0, 4, "heun"), [0.5], rtol=1e-6)
  np.testing.assert_allclose(flow.integrate(field, x0, 0.0, 1.0, 4, "euler"),
                             [sum(i / 4 for i in range(4)) / 4], rtol=1e-6)
  # Backward from t = 1 to 0: x(0) = x(1) - 1/2.
  np.testing.assert_allclose(flow.integrate(field, x0, 1.0, 0.0, 4, "heun"), [-0.5], rtol=1e-6)


@pytest.mark.parametrize("method", ["euler", "heun", "rk4"])
def test_straight_line_field_forward_then_backward_returns_the_start(method):
  # The rectified-flow field of a single pair (z0 -> z1): z_t on the line moves at z1 - z0.
  k0, k1 = jax.random.split(jax.random.PRNGKey(3))
  z0, z1 = jax.random.normal(k0, (2, 5)), jax.random.normal(k1, (2, 5))
  field = lambda z, t: z1 - z0
  end = flow.integrate(field, z0, 0.0, 1.0, 25, method)
  np.testing.assert_allclose(end, z1, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(flow.integrate(field, end, 1.0, 0.0, 25, method), z0,
                             rtol=1e-5, atol=1e-5)


def test_integrator_compiles_to_one_loop_whose_size_does_not_grow_with_steps():
  field = lambda x, t: -x * t
  for method in ("euler", "heun", "rk4"):
    jaxprs = {n: jax.make_jaxpr(lambda x: flow.integrate(field, x, 0.0, 1.0, n, method))(  # noqa: B023  (called within the iteration)
        jnp.ones(3)).jaxpr for n in (2, 50)}
    # One loop primitive (fori_loop lowers to scan or while), not 50 unrolled steps.
    for jaxpr in jaxprs.values():
      assert [e.primitive.name for e in jaxpr.eqns] in (["scan"], ["while"])
    body = [len(j.eqns[0].params.get("jaxpr", j.eqns[0].params.get("body_jaxpr")).eqns)
            for j in jaxprs.values()]
    assert body[0] == body[1]


def test_bad_arguments_are_rejected():
  with pytest.raises(ValueError, match="method"):
    flow.integrate(lambda z, t: z, jnp.ones(1), 0.0, 1.0, 2, "midpoint")
  with pytest.raises(ValueError, match="steps"):
    flow.integrate(lambda z, t: z, jnp.ones(1), 0.0, 1.0, 0)


# A time-dependent linear and an autonomous nonlinear field with closed-form solutions, stacked
# as two components: dz/dt = z cos(t) (z = z0 e^{sin t}) and dz/dt = -z^2 (z = z0 / (1 + z0 t)).
def _field(z, t):
  return jnp.stack([z[0] * jnp.cos(t), -z[1] ** 2])


def _exact(z0, t):
  return np.array([z0[0] * np.exp(np.sin(t)), z0[1] / (1 + z0[1] * t)])


@pytest.mark.parametrize("method,order,steps", [("euler", 1, (64, 128, 256, 512)),
                                                ("heun", 2, (8, 16, 32, 64)),
                                                ("rk4", 4, (4, 8, 16, 32))])
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_measured_convergence_order_is_the_method_order(method, order, steps, direction):
  # Float64, so the smallest errors (RK4 at 32 steps: ~1e-9) are far above rounding.
  with jax.enable_x64(True):
    z0 = np.array([0.7, 1.3])
    t0, t1 = (0.0, 1.5) if direction == "forward" else (1.5, 0.0)
    start = _exact(z0, t0)
    errors = []
    for n in steps:
      z = flow.integrate(_field, jnp.asarray(start, jnp.float64), t0, t1, n, method)
      assert z.dtype == jnp.float64
      errors.append(np.abs(np.asarray(z) - _exact(z0, t1)).max())
  # Slope of log(error) against log(step size), by least squares over the four step sizes.
  slope = np.polyfit(np.log(1.0 / np.asarray(steps)), np.log(errors), 1)[0]
  assert abs(slope - order) < 0.1 * order, (method, direction, slope, errors)


def test_network_evaluations_per_sampler():
  assert [flow.network_evaluations(10, m) for m in ("euler", "heun", "rk4")] == [10, 20, 40]
  calls = []

  def counting(z, t):
    calls.append(t)
    return -z
  for method, per_step in flow.EVALUATIONS_PER_STEP.items():
    calls.clear()
    jax.make_jaxpr(lambda z: flow.integrate(counting, z, 0.0, 1.0, 3, method))(jnp.ones(2))  # noqa: B023  (called within the iteration)
    assert len(calls) == per_step  # traced once per evaluation inside the loop body
  with pytest.raises(ValueError, match="steps"):
    flow.network_evaluations(0, "euler")
