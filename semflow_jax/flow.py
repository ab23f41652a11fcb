"""Rectified flow between image latents (t = 0) and anchor latents (t = 1). Pure math, no I/O.

One integrator serves both directions: t 0 -> 1 segments, t 1 -> 0 synthesises. It is a
`lax.fori_loop`, so inside `jax.jit` the whole trajectory is one compiled program.
"""

from typing import Callable

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (z, t scalar) -> dz/dt
METHODS = ("euler", "heun")


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


def flow_matching_loss(predicted_velocity, z0, z1):
  """Mean squared error against the straight-path velocity, averaged over all elements."""
  return jnp.mean(jnp.square(predicted_velocity - velocity_target(z0, z1)))


def step_function(velocity_fn: VelocityFn, t_start: float, t_end: float, steps: int,
                  method: str = "euler") -> Callable:
  """(i, z) -> z after step i of the fixed-step solve from t_start to t_end: the body that
  `integrate` loops over, for callers that need the states in between (`trajectory`) or act
  after every step."""
  if method not in METHODS:
    raise ValueError(f"unknown integrator method {method!r}; expected one of {METHODS}")
  if steps < 1:
    raise ValueError(f"steps must be >= 1, got {steps}")
  dt = (t_end - t_start) / steps

  def euler(i, z):
    t = t_start + i * dt
    return z + dt * velocity_fn(z, jnp.asarray(t, jnp.float32))

  def heun(i, z):
    t = t_start + i * dt
    k1 = velocity_fn(z, jnp.asarray(t, jnp.float32))
    k2 = velocity_fn(z + dt * k1, jnp.asarray(t + dt, jnp.float32))
    return z + 0.5 * dt * (k1 + k2)

  return euler if method == "euler" else heun


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
