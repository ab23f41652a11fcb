"""Rectified flow between image latents (t = 0) and anchor latents (t = 1). Pure math, no I/O.

One integrator serves both directions: t 0 -> 1 segments, t 1 -> 0 synthesises. It is a
`lax.fori_loop`, so inside `jax.jit` the whole trajectory is one compiled program. Samplers are
fixed-step Runge-Kutta methods: `euler` (order 1, one network evaluation per step), `heun`
(order 2, two) and `rk4` (classic Runge-Kutta, order 4, four); `network_evaluations` says what a
(steps, method) pair costs, so samplers are compared at equal cost.
"""

from typing import Callable

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (z, t scalar) -> dz/dt
# Network evaluations per step of each sampler.
EVALUATIONS_PER_STEP = {"euler": 1, "heun": 2, "rk4": 4}
METHODS = tuple(EVALUATIONS_PER_STEP)


def check_sampler(steps: int, method: str) -> None:
  if method not in METHODS:
    raise ValueError(f"unknown integrator method {method!r}; expected one of {METHODS}")
  if int(steps) != steps or steps < 1:
    raise ValueError(f"steps must be an integer >= 1, got {steps}")


def network_evaluations(steps: int, method: str) -> int:
  """How many times `integrate(..., steps, method)` calls the velocity field."""
  check_sampler(steps, method)
  return int(steps) * EVALUATIONS_PER_STEP[method]


def expand_time(t, z):
  """Broadcast per-example times (B,) against z (B, ...)."""
  t = jnp.asarray(t, z.dtype)
  return t.reshape(t.shape + (1,) * (z.ndim - t.ndim))


def interpolate(z0, z1, t):
  """z_t = (1 - t) z0 + t z1, with t a scalar or one time per example."""
  t = expand_time(t, z0)
  return (1.0 - t) * z0 + t * z1


def velocity_target(z0, z1):
  """d z_t / dt along the straight path."""
  return z1 - z0


def flow_matching_loss(predicted_velocity, z0, z1, weights=None):
  """The rectified-flow loss: mean squared error against the straight-path velocity.

  Args:
    predicted_velocity: (B, ...) the model's velocity at z_t.
    z0: (B, ...) the path's start (the image latents).
    z1: (B, ...) the path's end (the anchor latents).
    weights: optional (B,) per-example weights (the padding mask); None weighs all equally.

  Returns:
    The per-example mean over all elements, averaged over the examples with `weights` (divided
    by their sum, at least 1, so an all-padding batch gives 0, not NaN).
  """
  error = jnp.square(predicted_velocity - velocity_target(z0, z1))
  per_example = jnp.mean(error, axis=tuple(range(1, error.ndim)))
  if weights is None:
    weights = jnp.ones_like(per_example)
  return jnp.sum(per_example * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def step_function(velocity_fn: VelocityFn, t_start: float, t_end: float, steps: int,
                  method: str = "euler") -> Callable:
  """(i, z) -> z after step i of the fixed-step solve from t_start to t_end: the body that
  `integrate` loops over, for callers that need the states in between (`trajectory`) or act
  after every step."""
  check_sampler(steps, method)
  dt = (t_end - t_start) / steps

  def time(t, z):
    # Times in float32 (float64 when z is, so convergence can be measured below float32 noise).
    return jnp.asarray(t, jnp.promote_types(jnp.asarray(z).dtype, jnp.float32))

  def euler(i, z):
    t = t_start + i * dt
    return z + dt * velocity_fn(z, time(t, z))

  def heun(i, z):
    t = t_start + i * dt
    k1 = velocity_fn(z, time(t, z))
    k2 = velocity_fn(z + dt * k1, time(t + dt, z))
    return z + 0.5 * dt * (k1 + k2)

  def rk4(i, z):
    t = t_start + i * dt
    k1 = velocity_fn(z, time(t, z))
    k2 = velocity_fn(z + 0.5 * dt * k1, time(t + 0.5 * dt, z))
    k3 = velocity_fn(z + 0.5 * dt * k2, time(t + 0.5 * dt, z))
    k4 = velocity_fn(z + dt * k3, time(t + dt, z))
    return z + (dt / 6.0) * (k1 + 2.0 * k2 + 2.0 * k3 + k4)

  return {"euler": euler, "heun": heun, "rk4": rk4}[method]


def integrate(velocity_fn: VelocityFn, z, t_start: float, t_end: float, steps: int,
              method: str = "euler"):
  """Fixed-step ODE solve of dz/dt = velocity_fn(z, t) from t_start to t_end.

  `steps` and `method` are static; t_start > t_end integrates backward in time.
  """
  return jax.lax.fori_loop(0, steps, step_function(velocity_fn, t_start, t_end, steps, method), z)


def trajectory(velocity_fn: VelocityFn, z, t_start: float, t_end: float, steps: int,
               method: str = "euler"):
  """Every state of `integrate(...)`, (steps + 1, *z.shape): z at t_start + i (t_end - t_start)
  / steps for i = 0..steps, the same numbers `integrate` computes (its last one is the result)."""
  step = step_function(velocity_fn, t_start, t_end, steps, method)

  def body(z, i):
    z = step(i, z)
    return z, z

  _, states = jax.lax.scan(body, z, jnp.arange(steps))
  return jnp.concatenate([z[None], states])
