"""Training state: what a checkpoint holds, how it is created sharded, how params come back."""

from typing import Any, Optional

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from semflow_jax import checkpoint, parallel, storage
from semflow_jax.semflow import SemFlow, param_labels


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Optional[Any]  # None when config.train.ema_decay == 0
  rng: jax.Array             # base key; step k uses fold_in(rng, k), so resume is exact
  skipped: jax.Array         # updates dropped for a non-finite loss or gradient (train.skip_nonfinite)


SCHEDULES = ("cosine", "linear", "constant")


def learning_rate_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  """Linear warmup from 0 over train.warmup_steps to train.learning_rate, then
  train.schedule: 'cosine' (to 0 at num_steps), 'linear' (to 0 at num_steps; the official
  CelebAMask-HQ and Cityscapes recipes) or 'constant' (the official COCO-Stuff recipe)."""
  t = config.train
  kind = t.get("schedule", "cosine")
  if kind not in SCHEDULES:
    raise ValueError(f"config.train.schedule={kind!r}: expected one of {SCHEDULES}")
  warmup = t.warmup_steps
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=t.learning_rate, warmup_steps=warmup,
        decay_steps=max(t.num_steps, warmup + 1), end_value=0.0)
  after = (optax.constant_schedule(t.learning_rate) if kind == "constant" else
           optax.linear_schedule(t.learning_rate, 0.0, max(t.num_steps - warmup, 1)))
  return optax.join_schedules([optax.linear_schedule(0.0, t.learning_rate, warmup), after],
                              [warmup])


def applied_learning_rate(schedule: optax.Schedule, opt_state) -> jax.Array:
  """The learning rate the next update applies: the schedule at the optimiser's own update
  count (which a skipped non-finite step does not advance, unlike state.step)."""
  count = optax.tree_utils.tree_get(
      opt_state, "count",
      filtering=lambda path, _: getattr(path[-1], "tuple_name", "") == "ScaleByScheduleState")
  return schedule(count)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW on the UNet; the frozen VAE and text embedding get no update and no optimizer state."""
  t = config.train
  adamw = optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.999, weight_decay=t.weight_decay))
  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, param_labels)


def _init_fn(model: SemFlow, tx: optax.GradientTransformation, config):
  def init(rng, loaded=None):
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng)
    if loaded is not None:  # converted weights (config.model.init_from) replace the random ones
      params = {**params, **loaded}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      ema_params=params if config.train.ema_decay > 0 else None, rng=state_rng,
                      skipped=jnp.zeros((), jnp.int32))
  return init


def create(model: SemFlow, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
           mesh: Mesh) -> TrainState:
  """A fresh state, created directly in its sharded layout; from `config.model.init_from` (the
  converted weights, checked against the model's shapes) when that is set. Those are read
  straight into their shards (no host copy of the whole tree) and donated to the state."""
  layout = shardings(model, tx, config, mesh)
  init_from = config.model.get("init_from")
  if not init_from:
    return jax.jit(_init_fn(model, tx, config), out_shardings=layout)(
        jax.random.PRNGKey(config.seed))
  loaded = checkpoint.load_converted(init_from, abstract_params(model, config, mesh))
  logging.info("initialised %s from %s", ", ".join(sorted(loaded)), init_from)
  init = jax.jit(_init_fn(model, tx, config), out_shardings=layout, donate_argnums=1)
  return init(jax.random.PRNGKey(config.seed), loaded)


def shardings(model, tx, config, mesh) -> TrainState:
  """The state's layout on `mesh`: parallel.state_shardings of its shapes."""
  return parallel.state_shardings(jax.eval_shape(_init_fn(model, tx, config),
                                                 jax.random.PRNGKey(0)), mesh, config)


def abstract_params(model, config, mesh):
  """Shapes, dtypes and shardings of the parameters alone (what inference programs take)."""
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      parallel.state_shardings(shapes, mesh, config))


def abstract(model, tx, config, mesh) -> TrainState:
  """Shapes, dtypes and shardings of the state, without allocating it: the restore target."""
  shapes = jax.eval_shape(_init_fn(model, tx, config), jax.random.PRNGKey(0))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      parallel.state_shardings(shapes, mesh, config))


def load_params(config, workdir: str, mesh: Mesh, use_ema: bool = True):
  """(params, step) from the latest checkpoint in `workdir`: the EMA params when kept (and
  `use_ema`), else the params (each with the frozen VAE and text embedding). Nothing else is
  read: the optimiser state and the other parameter copy are Orbax placeholders in the restore
  target."""
  model = SemFlow.from_config(config, mesh)
  tx = make_optimizer(config)
  target = abstract(model, tx, config, mesh)
  use_ema = use_ema and target.ema_params is not None
  skip = checkpoint.not_read
  target = target.replace(
      opt_state=skip(target.opt_state),
      params=skip(target.params) if use_ema else target.params,
      ema_params=target.ema_params if use_ema or target.ema_params is None else skip(
          target.ema_params))
  restored = None
  workdir = storage.resolve(workdir)
  if storage.is_dir(storage.join(workdir, "checkpoints")):  # reading must not create it
    manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints, read_only=True)
    restored = checkpoint.restore_latest(manager, target, model.checkpoint_record(),
                                         with_data=False)
    manager.close()
    restored = restored and restored[0]
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train first with "
                            f"--mode=train --workdir={workdir}")
  return (restored.ema_params if use_ema else restored.params), int(restored.step)
