"""The lean train step (semflow_jax/step.py) on the tiny SD config: the same loss and update as
the step before it (gradients over the whole parameter tree, the frozen parts zeroed by the
optimiser), gradient accumulation (on the tiny pixel-space model) and the EMA against
independent computations, and the loss
from cached image moments equal to the loss from the images."""

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import sd15
from semflow_jax import parallel, state as state_lib, step as step_lib
from semflow_jax.semflow import FROZEN, SemFlow


def _config(**train):
  config = sd15.get_config("tiny")
  config.train.update(ema_decay=0.9, warmup_steps=0, schedule="constant", weight_decay=0.01,
                      grad_clip=0.5, **train)  # clipping active: the norm must be the same
  return config


def _pixel_config(**train):
  """The same training settings on the tiny pixel-space model (no frozen parts): for what does
  not depend on the VAE, at a fraction of the compile time."""
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.train.update(ema_decay=0.9, warmup_steps=0, schedule="constant", weight_decay=0.01,
                      grad_clip=0.5, **train)
  return config


def _batch(config, seed=0, n=None):
  rng = np.random.default_rng(seed)
  n, size = n or config.train.batch_size, config.data.image_size
  return {"image": rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
          "label": rng.integers(0, config.data.num_classes, (n, size, size, 1), dtype=np.uint8)}


@struct.dataclass
class _StateBefore:
  """The train state before the lean step: the whole model in params and in the EMA."""
  step: jax.Array
  params: dict
  opt_state: object
  ema_params: object
  rng: jax.Array


def _step_before(model, config):
  """The train step as it was (semflow_jax.train before issue 17): value_and_grad over the whole
  parameter tree, an optax.multi_transform that gives the frozen groups set_to_zero, the EMA
  over every parameter. Written out here as the reference."""
  labels = lambda params: {k: "frozen" if k in FROZEN else "train" for k in params}
  tx = optax.multi_transform({"train": state_lib.make_optimizer(config),
                              "frozen": optax.set_to_zero()}, labels)

  def step(state, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, grads = jax.value_and_grad(model.loss)(state.params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    n = state.step.astype(jnp.float32)
    decay = jnp.minimum(config.train.ema_decay, (1.0 + n) / (10.0 + n))
    ema = jax.tree.map(lambda e, p: e + (1 - decay) * (p - e), state.ema_params, params)
    return _StateBefore(state.step + 1, params, opt_state, ema, state.rng), (
        loss, optax.tree.norm(grads))

  return tx, jax.jit(step)


def _close(a, b, rtol=2e-5, atol=1e-7):
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b)),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def _host_copy(tree):
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(tree))


def _same_update(a, b, lr, steps):
  """Parameters after Adam steps: Adam divides each gradient by its own size, so where a
  gradient is near zero the last-bit differences of another reduction order become a visible
  fraction of the learning rate. Nearly every element agrees to float32 rounding; none is off by
  more than 5% of the learning rate per step."""
  x = np.concatenate([np.ravel(l) for l in jax.tree.leaves(jax.device_get(a))])
  y = np.concatenate([np.ravel(l) for l in jax.tree.leaves(jax.device_get(b))])
  np.testing.assert_allclose(x, y, rtol=0, atol=0.05 * lr * steps)
  assert np.mean(~np.isclose(x, y, rtol=2e-5, atol=1e-7)) < 1e-3


def test_lean_step_matches_the_step_before_it_and_keeps_an_ema_of_the_unet_only():
  config = _config()
  config.mesh.data, config.mesh.fsdp, config.mesh.fsdp_min_size = 2, 4, 256
  mesh = parallel.make_mesh(config)
  model, tx = SemFlow.from_config(config, mesh), state_lib.make_optimizer(config)
  state = state_lib.create(model, tx, config, mesh)
  # The frozen parts are not in the trained tree, have no optimiser state and no EMA.
  assert set(state.params) == {"unet"} and set(state.frozen) == {"vae", "context"}
  assert set(state.ema_params) == {"unet"}
  unet_leaves = len(jax.tree.leaves(state.params))
  assert len(jax.tree.leaves(state.opt_state)) == 2 * unet_leaves + 2  # mu, nu, two counts
  assert any("fsdp" in x.sharding.spec for x in jax.tree.leaves(state.params))

  # Host copies: on CPU device_get may share the buffers that the step donates and reuses.
  full = _host_copy(state.model_params(ema=False))
  tx_before, step_before = _step_before(SemFlow.from_config(config), config)
  before = _StateBefore(jnp.zeros((), jnp.int32), full, tx_before.init(full), full,
                        jax.device_get(state.rng))  # the lean step donates its state

  train_step, _ = step_lib.compile_train_step(model, tx, config, mesh,
                                              state_lib.abstract(model, tx, config, mesh),
                                              step_lib.train_batch_spec(model, config))
  emas = [_host_copy(state.ema_params)]
  params = [_host_copy(state.params)]
  for seed in range(2):
    batch = _batch(config, seed)
    state, metrics = train_step(state, parallel.to_global(batch, mesh))
    before, (loss, grad_norm) = step_before(before, batch)
    np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
    np.testing.assert_allclose(metrics["grad_norm"], grad_norm, rtol=1e-4)
    emas.append(_host_copy(state.ema_params))
    params.append(_host_copy(state.params))
  assert not np.allclose(params[0]["unet"]["conv_in"]["kernel"],
                         params[2]["unet"]["conv_in"]["kernel"])  # the UNet really moved
  _same_update(state.params["unet"], before.params["unet"], config.train.learning_rate, 2)
  _close(state.frozen, {k: full[k] for k in FROZEN}, rtol=0, atol=0)  # untouched, bit for bit
  for key in FROZEN:
    _close(before.params[key], full[key], rtol=0, atol=0)

  # The EMA, computed independently on the host: e_{n+1} = e_n + (1 - d_n) (p_{n+1} - e_n),
  # d_n = min(decay, (1 + n) / (10 + n)).
  for n in range(2):
    d = min(0.9, (1 + n) / (10 + n))
    expected = jax.tree.map(lambda e, p: e + (1 - d) * (p - e), emas[n], params[n + 1])  # noqa: B023  (called within the iteration)
    _close(emas[n + 1], expected, rtol=1e-6)


def test_gradient_accumulation_equals_the_micro_batches_with_the_same_times_and_noise():
  """k micro-batches: the loss is the mean of the micro-batches' losses and the update the
  optimiser's on the mean of their gradients, micro-batch j (examples j, j + k, ...) drawing
  its times and noise from fold_in(step key, j)."""
  k = 2
  config = _pixel_config(grad_accum_steps=k)
  mesh = parallel.make_mesh(config, jax.devices()[:1])
  model, tx = SemFlow.from_config(config, mesh), state_lib.make_optimizer(config)
  state = state_lib.create(model, tx, config, mesh)
  initial = _host_copy(state)  # the step donates `state`
  train_step, _ = step_lib.compile_train_step(model, tx, config, mesh,
                                              state_lib.abstract(model, tx, config, mesh),
                                              step_lib.train_batch_spec(model, config))
  batch = _batch(config, seed=3)
  state, metrics = train_step(state, parallel.to_global(batch, mesh))

  # The un-accumulated gradient of each micro-batch, with the key the step gives it.
  grad = jax.jit(jax.value_and_grad(
      lambda p, b, r: model.loss({**initial.frozen, **p}, b, r)))
  step_key = jax.random.fold_in(initial.rng, initial.step)
  losses, grads = zip(*[grad(initial.params, jax.tree.map(lambda x: x[j::k], batch),  # noqa: B023  (called within the iteration)
                             jax.random.fold_in(step_key, j)) for j in range(k)])
  mean_grads = jax.tree.map(lambda *g: sum(g) / k, *grads)
  np.testing.assert_allclose(metrics["loss"], np.mean(losses), rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(mean_grads), rtol=1e-4)
  updates, _ = tx.update(mean_grads, initial.opt_state, initial.params)
  _same_update(state.params, optax.apply_updates(initial.params, updates),
               config.train.learning_rate, 1)
  # One micro-batch's gradient alone would be a different update.
  assert not np.allclose(optax.tree.norm(grads[0]), optax.tree.norm(mean_grads), rtol=1e-3)


def test_loss_from_cached_image_moments_equals_the_loss_from_images():
  config = _config()
  model = SemFlow.from_config(config)
  params = jax.jit(model.init)(jax.random.PRNGKey(0))
  batch = _batch(config, seed=5, n=4)
  moments = jax.jit(model.image_moments)(params, batch["image"])
  assert moments.shape == (4, *model.latent_shape[:2], 2 * model.latent_shape[2])
  assert moments.dtype == step_lib.MOMENTS_DTYPE
  cached = {"image_moments": np.asarray(moments), "label": batch["label"]}
  loss = jax.jit(model.loss)
  for seed in range(3):
    key = jax.random.PRNGKey(seed)
    from_images = loss(params, batch, key)
    np.testing.assert_allclose(loss(params, cached, key), from_images, rtol=1e-6)
  # The latent is really sampled from the moments: another key, another loss.
  assert not np.isclose(loss(params, cached, jax.random.PRNGKey(7)), from_images, rtol=1e-4)

  # The batch the step takes when the config says so.
  config.data.image_latents = "/cached/latents"
  spec = step_lib.train_batch_spec(model, config)
  assert set(spec) == {"image_moments", "label"}
  assert spec["image_moments"] == ((config.train.batch_size, *moments.shape[1:]),
                                   step_lib.MOMENTS_DTYPE)


def test_cached_latents_need_the_sd_vae():
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.data.image_latents = "/cached/latents"
  with pytest.raises(ValueError, match="config.data.image_latents"):
    step_lib.train_batch_spec(SemFlow.from_config(config), config)
