"""The compiled train step: the loop (train.py), the planner (plan.py) and the benchmarks share it.

It imports neither TensorFlow nor the input pipeline. One step: the loss and the gradients of
the trained parameters (the UNet) only, summed over `train.grad_accum_steps` micro-batches in a
`scan`; global-norm clipping and AdamW; the EMA of the trained parameters. The frozen VAE and
text embedding (`state.frozen`) are inputs: not differentiated, no accumulator, no norm, no EMA.
Gradients and the accumulator are laid out like the optimiser state (sharded over `fsdp`:
reduce-scattered, never gathered whole; the parameters too with FSDP, or whole on every device
with config.mesh.shard_params=False), the UNet's activations batch-split over every device (SemFlow's `mesh`).

A training batch is {key: global array} split over every device along its first dimension:
  'image'         uint8 (B, H, W, 3), or instead
  'image_moments' float (B, H/8, W/8, 8): the SD-VAE posterior's mean and log-variance of each
                  image, concatenated on channels (`SemFlow.image_moments`), when
                  config.data.image_latents is set; z0 is sampled from them every step;
  'label'         uint8 (B, H, W, 1), rendered to the perturbed anchor image and encoded every
                  step.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from semflow_jax import flops as flops_lib, parallel, state as state_lib
from semflow_jax.semflow import SemFlow

MOMENTS_DTYPE = np.float32  # of 'image_moments' in a batch (the loss computes in float32)


def uses_image_latents(config) -> bool:
  """Does a run's batch carry cached image moments (config.data.image_latents) for images?"""
  return bool(config.data.get("image_latents"))


def train_batch_spec(model: SemFlow, config) -> dict:
  """{key: (global shape, dtype)} of a training batch (see the module docstring)."""
  b, (h, w) = config.train.batch_size, model.image_size
  spec = {"label": ((b, h, w, 1), np.uint8)}
  if uses_image_latents(config):
    if not model.has_vae:
      raise ValueError("config.data.image_latents is set but config.model.autoencoder is "
                       f"{type(model.autoencoder).__name__}: cached latents are the SD VAE's")
    lh, lw, c = model.latent_shape
    spec["image_moments"] = ((b, lh, lw, 2 * c), MOMENTS_DTYPE)
  else:
    spec["image"] = ((b, h, w, 3), np.uint8)
  return spec


def make_loss_and_grads(model: SemFlow, config, mesh=None):
  """(params, frozen, batch, rng) -> (loss, gradients of `params`): the step's forward and
  backward. With train.grad_accum_steps = k the batch is split into k micro-batches whose
  gradients are averaged (a scan), so peak activation memory is that of one micro-batch.
  `mesh` (the one the state is laid out on) makes the gradients' and the accumulator's layout
  that of the optimiser state (sharded over `fsdp`, reduce-scattered, whether or not the
  parameters are: mesh.shard_params), and keeps each micro-batch spread over all devices."""
  k = config.train.get("grad_accum_steps", 1)

  def like_optimizer_state(grads):
    if mesh is None:
      return grads
    return jax.lax.with_sharding_constraint(grads, parallel.state_shardings(grads, mesh, config))

  def loss_and_grads(params, frozen, batch, rng):
    def loss_fn(params, batch, rng):
      return model.loss({**frozen, **params}, batch, rng)

    if k == 1:
      loss, grads = jax.value_and_grad(loss_fn)(params, batch, rng)
      return loss, like_optimizer_state(grads)
    # Micro-batch j holds examples j, j + k, j + 2k, ...: every device already holds its share
    # of every micro-batch, so the split moves no data.
    micro = jax.tree.map(lambda x: x.reshape(x.shape[0] // k, k, *x.shape[1:]).swapaxes(0, 1),
                         batch)
    if mesh is not None:
      micro = jax.lax.with_sharding_constraint(
          micro, NamedSharding(mesh, P(None, parallel.BATCH_AXES)))

    def accumulate(carry, xs):
      j, micro_batch = xs
      loss, grads = jax.value_and_grad(loss_fn)(params, micro_batch, jax.random.fold_in(rng, j))
      return like_optimizer_state(jax.tree.map(jnp.add, carry, (loss, grads))), None

    zeros = (jnp.zeros((), jnp.float32), like_optimizer_state(jax.tree.map(jnp.zeros_like, params)))
    (loss, grads), _ = jax.lax.scan(accumulate, zeros, (jnp.arange(k), micro))
    return loss / k, jax.tree.map(lambda g: g / k, grads)

  return loss_and_grads


def make_update(tx: optax.GradientTransformation, config):
  """(state, grads) -> state: the optimiser's update of the trained parameters (`tx`, i.e.
  state.make_optimizer: clipping and AdamW) and their EMA; the step counter is the caller's."""
  ema_decay = config.train.ema_decay

  def apply_update(state: state_lib.TrainState, grads) -> state_lib.TrainState:
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = state.ema_params
    if ema is not None:
      # The decay warms up as (1 + n) / (10 + n) towards train.ema_decay, so the random
      # initialisation does not linger in the average of a short run.
      n = state.step.astype(jnp.float32)
      decay = jnp.minimum(ema_decay, (1.0 + n) / (10.0 + n))
      ema = jax.tree.map(lambda e, p: e + (1 - decay) * (p - e), ema, params)
    return state.replace(params=params, opt_state=opt_state, ema_params=ema)

  return apply_update


def make_train_step(model: SemFlow, tx: optax.GradientTransformation, config, mesh=None):
  """(state, global batch) -> (state, metrics): `make_loss_and_grads`, then `make_update`
  where the loss and the gradient norm are finite."""
  schedule = state_lib.learning_rate_schedule(config)
  loss_and_grads = make_loss_and_grads(model, config, mesh)
  apply_update = make_update(tx, config)

  def train_step(state: state_lib.TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss, grads = loss_and_grads(state.params, state.frozen, batch, rng)
    grad_norm = optax.tree.norm(grads)
    # A non-finite loss or gradient is never applied: the state keeps its last good values, so
    # what the host saves or stops on is always finite. A cond, not a select of new and old
    # values: a select reads both versions of every parameter and moment, so XLA cannot update
    # the donated buffers in place and copies the whole state every step.
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    new_state = jax.lax.cond(finite, lambda state: apply_update(state, grads), lambda state: state,
                             state)
    new_state = new_state.replace(step=state.step + 1,
                                  skipped=state.skipped + (1 - finite.astype(jnp.int32)))
    metrics = {"loss": loss, "grad_norm": grad_norm,
               "param_norm": optax.tree.norm(new_state.params),
               # What this update applied (a skipped step does not advance the optimiser).
               "learning_rate": state_lib.applied_learning_rate(schedule, state.opt_state),
               "finite": finite,
               "skipped": new_state.skipped}
    return new_state, metrics

  return train_step


def abstract_batch(batch_spec: dict, mesh) -> dict:
  """ShapeDtypeStructs of a global batch {key: (shape, dtype)} split over every device."""
  sharding = parallel.batch_sharding(mesh)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
          for k, (shape, dtype) in batch_spec.items()}


def trace_train_step(model: SemFlow, tx: optax.GradientTransformation, config, mesh,
                     abstract_state, batch_spec: dict) -> jax.stages.Traced:
  """The train step exactly as train_and_evaluate runs it, traced from ShapeDtypeStructs.

  The state (`state.abstract`) is donated and comes back in its own layout; `batch_spec` is
  {key: (shape, dtype)} of the global batch (`train_batch_spec`), split over every device.
  `mesh` may be made of a TPU topology's devices (semflow_jax.plan compiles this for TPUs on a
  CPU). `.jaxpr` is what `flops.count` reads, `.lower()` what compiles.
  """
  state_shardings = state_lib.shardings_of(abstract_state)
  return jax.jit(make_train_step(model, tx, config, mesh),
                 out_shardings=(state_shardings, parallel.replicated(mesh)),
                 donate_argnums=0).trace(abstract_state, abstract_batch(batch_spec, mesh))


def lower_train_step(model, tx, config, mesh, abstract_state, batch_spec) -> jax.stages.Lowered:
  """`trace_train_step(...).lower()`."""
  return trace_train_step(model, tx, config, mesh, abstract_state, batch_spec).lower()


def compile_train_step(model, tx, config, mesh, abstract_state, batch_spec):
  """(the compiled step, its FLOPs per device per step (flops.per_device: XLA's count plus the
  loop iterations and kernels it does not see)), for the loop's MFU."""
  traced = trace_train_step(model, tx, config, mesh, abstract_state, batch_spec)
  compiled = traced.lower().compile()
  cost = flops_lib.per_device(flops_lib.cost_analysis(compiled), flops_lib.count(traced.jaxpr),
                              mesh.devices.size)
  return compiled, cost["flops"]
