"""The fused GroupNorm(+FiLM+SiLU) against flax's nn.GroupNorm composed with the same ops,
values and gradients (JAX autodiff of the reference vs the hand-written backward)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from semflow_jax.models.normalization import GroupNorm

CASES = [((2, 5, 6, 12), 4, True, True), ((2, 5, 6, 12), 3, False, True),
         ((3, 7, 8), 2, False, False), ((2, 4, 4, 8), 8, True, False)]


def _reference(groups, film, silu, eps=1e-5):
  module = nn.GroupNorm(groups, epsilon=eps, use_fast_variance=False)

  def apply(params, x, s, t):
    y = module.apply(params, x)
    if film:
      expand = lambda v: v.reshape(v.shape[0], *(1,) * (x.ndim - 2), v.shape[-1])
      y = y * (1 + expand(s)) + expand(t)
    return nn.silu(y) if silu else y
  return module, apply


def _inputs(shape, film, seed=0):
  rng = np.random.default_rng(seed)
  # Offset mean: a one-pass variance would lose digits here; the two-pass one must not.
  x = jnp.asarray(rng.normal(3.0, 2.0, shape), jnp.float32)
  s, t = ((jnp.asarray(rng.normal(size=(shape[0], shape[-1])), jnp.float32) for _ in range(2))
          if film else (None, None))
  g = jnp.asarray(rng.normal(size=shape), jnp.float32)
  return x, s, t, g


@pytest.mark.parametrize("shape,groups,film,silu", CASES)
def test_values_and_gradients_match_flax_group_norm(shape, groups, film, silu):
  x, s, t, g = _inputs(shape, film)
  module, reference = _reference(groups, film, silu)
  params = module.init(jax.random.PRNGKey(0), x)
  rng = np.random.default_rng(1)
  params = jax.tree.map(lambda p: p + jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
  ours_module = GroupNorm(groups, epsilon=1e-5)
  assert jax.tree.map(jnp.shape, ours_module.init(jax.random.PRNGKey(0), x)) == \
      jax.tree.map(jnp.shape, params)  # same parameter names and shapes: checkpoints carry over

  def ours(p, x, s, t):
    return ours_module.apply(p, x, film=(s, t) if film else None, silu=silu)

  expected, got = reference(params, x, s, t), ours(params, x, s, t)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())  # pyright: ignore[reportCallIssue]
  argnums = (0, 1, 2, 3) if film else (0, 1)
  loss = lambda f: lambda *a: jnp.sum(f(*a) * g)
  expected_grads = jax.grad(loss(reference), argnums)(params, x, s, t)
  grads = jax.grad(loss(ours), argnums)(params, x, s, t)
  for e, o in zip(jax.tree.leaves(expected_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(o, e, rtol=1e-4, atol=1e-5 * np.abs(e).max())


def test_bfloat16_input_gives_bfloat16_output_and_gradient_close_to_float32():
  x, s, t, g = _inputs((2, 6, 6, 16), film=True)
  module = GroupNorm(4, epsilon=1e-5, dtype=jnp.bfloat16)
  params = module.init(jax.random.PRNGKey(0), x)
  full = GroupNorm(4, epsilon=1e-5).apply(params, x, film=(s, t), silu=True)
  half = module.apply(params, x.astype(jnp.bfloat16), film=(s, t), silu=True)
  assert half.dtype == jnp.bfloat16  # pyright: ignore[reportAttributeAccessIssue]
  np.testing.assert_allclose(half.astype(jnp.float32), full, atol=0.02 * np.abs(full).max())  # pyright: ignore[reportAttributeAccessIssue, reportCallIssue]
  grad = jax.grad(lambda x: jnp.sum(module.apply(params, x, film=(s, t), silu=True)
                                    .astype(jnp.float32) * g))(x.astype(jnp.bfloat16))  # pyright: ignore[reportAttributeAccessIssue]
  grad_full = jax.grad(lambda x: jnp.sum(GroupNorm(4, epsilon=1e-5).apply(
      params, x, film=(s, t), silu=True) * g))(x)
  assert grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(grad.astype(jnp.float32), grad_full,
                             atol=0.03 * np.abs(grad_full).max())


def test_channels_that_do_not_split_into_groups_are_refused_by_name():
  with pytest.raises(ValueError, match="norm1: 12 channels do not split into 5 groups"):
    GroupNorm(5, name="norm1").init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 2, 12)))
