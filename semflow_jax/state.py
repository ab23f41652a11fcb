"""Training state: what a checkpoint holds, how it is created sharded, how params come back."""

from typing import TYPE_CHECKING, Any, Optional

from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from absl import logging
from jax.sharding import Mesh

from semflow_jax import checkpoint, parallel, storage
from semflow_jax.semflow import FROZEN, SemFlow


@struct.dataclass
class TrainState:
  """What a checkpoint holds. Only `params` (the UNet) is trained: it alone has gradients, an
  optimiser state and an EMA; `frozen` (the SD VAE and the text embedding, {} in pixel space)
  is read by the step, never differentiated or updated."""
  step: jax.Array
  params: Any                # {'unet': ...}: the trained parameters
  frozen: Any                # {'vae': ..., 'context': ...} when the model has them, else {}
  opt_state: Any             # AdamW over `params`
  ema_params: Optional[Any]  # EMA of `params`; None when config.train.ema_decay == 0
  rng: jax.Array             # base key; step k uses fold_in(rng, k), so resume is exact
  skipped: jax.Array         # updates dropped for a non-finite loss or gradient (train.skip_nonfinite)

  if TYPE_CHECKING:  # flax.struct.dataclass adds it at run time; declared for the type checker
    def replace(self, **updates: Any) -> "TrainState": ...

  def model_params(self, ema: bool = True) -> dict:
    """The model's whole parameter dict (what SemFlow's methods take): the EMA of the trained
    parameters when kept and `ema`, else the parameters, with the frozen parts."""
    trained = self.ema_params if ema and self.ema_params is not None else self.params
    return {**self.frozen, **trained}


def split_params(params: dict) -> tuple:
  """SemFlow's parameter dict -> (trained, frozen) parts (semflow.FROZEN)."""
  return ({k: v for k, v in params.items() if k not in FROZEN},
          {k: v for k, v in params.items() if k in FROZEN})


SCHEDULES = ("cosine", "linear", "constant")


def model_param_shardings(params: dict, mesh: Mesh, config: ml_collections.ConfigDict) -> dict:
  """The layout of SemFlow's whole parameter dict, as training lays it out (`abstract`): the
  trained parameters by `parallel.param_shardings`, the frozen parts whole on every device."""
  trained, frozen = split_params(params)
  return {**parallel.param_shardings(trained, mesh, config), **parallel.whole(frozen, mesh)}


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
  """AdamW with global-norm clipping, over the trained parameters (TrainState.params) only."""
  t = config.train
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.999, weight_decay=t.weight_decay))


def _init_fn(model: SemFlow, tx: optax.GradientTransformation, config):
  def init(rng, loaded=None):
    init_rng, state_rng = jax.random.split(rng)
    params = model.init(init_rng)
    if loaded is not None:  # converted weights (config.model.init_from) replace the random ones
      params = {**params, **loaded}
    params, frozen = split_params(params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, frozen=frozen,
                      opt_state=tx.init(params),
                      ema_params=params if config.train.ema_decay > 0 else None, rng=state_rng,
                      skipped=jnp.zeros((), jnp.int32))
  return init


def abstract(model, tx, config, mesh) -> TrainState:
  """Shapes, dtypes and shardings (parallel.state_shardings) of the state, nothing allocated:
  the restore target, the step's input, and (`.model_params()`) the inference programs'."""
  shapes = jax.eval_shape(_init_fn(model, tx, config), jax.random.PRNGKey(0))
  shardings = parallel.state_shardings(shapes, mesh, config)
  # The trained parameters' own layout (whole on every device with mesh.shard_params=False);
  # the optimiser state and the EMA keep the sharding rule either way. The frozen VAE and text
  # embedding are always whole (0.3 GiB): sharded, every step would all-gather them per layer,
  # and XLA partitions the VAE's 512^2 convolutions over their sharded kernels instead.
  shardings = shardings.replace(params=parallel.param_shardings(shapes.params, mesh, config),
                                frozen=parallel.whole(shapes.frozen, mesh))
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                      shardings)


def shardings_of(tree):
  """The `.sharding` of every leaf (of arrays or of ShapeDtypeStructs such as `abstract`'s)."""
  return jax.tree.map(lambda x: x.sharding, tree)


def create(model: SemFlow, tx: optax.GradientTransformation, config: ml_collections.ConfigDict,
           mesh: Mesh) -> TrainState:
  """A fresh state, created directly in its sharded layout; from `config.model.init_from` (the
  converted weights, checked against the model's shapes) when that is set. Those are read
  straight into their shards (no host copy of the whole tree) and donated to the state."""
  target = abstract(model, tx, config, mesh)
  init_from = config.model.get("init_from")
  if not init_from:
    return jax.jit(_init_fn(model, tx, config), out_shardings=shardings_of(target))(
        jax.random.PRNGKey(config.seed))
  loaded = checkpoint.load_converted(init_from, target.model_params(ema=False))
  logging.info("initialised %s from %s", ", ".join(sorted(loaded)), init_from)
  init = jax.jit(_init_fn(model, tx, config), out_shardings=shardings_of(target),
                 donate_argnums=1)
  return init(jax.random.PRNGKey(config.seed), loaded)


# -- checkpoints of the layout before the lean step -------------------------------------------
# Until issue 17 the state kept the frozen VAE and text embedding inside `params` (and in the
# EMA), with an optax.multi_transform optimiser over the whole tree. Such checkpoints are still
# read for sampling and evaluation (`load_params`); resuming training from them is refused.


def _saved_tree(manager, step: int) -> dict:
  saved = manager.item_metadata(step)["state"]
  return dict(getattr(saved, "tree", saved))


def _is_before_lean_step(saved: dict) -> bool:
  opt_state = saved.get("opt_state")
  return "frozen" not in saved and isinstance(opt_state, dict) and "inner_states" in opt_state


def check_resumable(manager) -> None:
  """Raise checkpoint.IncompatibleCheckpointError (one line) if the latest checkpoint in
  `manager` has the train state of before the lean step, which training cannot continue."""
  step = manager.latest_step()
  if step is not None and _is_before_lean_step(_saved_tree(manager, step)):
    raise checkpoint.IncompatibleCheckpointError(
        f"checkpoint {manager.directory}/{step} has the train state of semflow_jax before the "
        "lean train step (frozen VAE and text embedding inside params, optimiser over all of "
        "them): training cannot resume from it (sampling and --mode=eval still read it); "
        "train into a new --workdir")


def load_params(config, workdir: str, mesh: Mesh, use_ema: bool = True):
  """(params, step) from the latest checkpoint in `workdir`: the model's whole parameter dict,
  with the EMA of the trained parameters when kept (and `use_ema`), else the trained
  parameters, and the frozen VAE and text embedding. Nothing else is read: every other leaf of
  the checkpoint is an Orbax placeholder in the restore target. Checkpoints of the layout
  before the lean step (frozen parts inside params and EMA) are read too."""
  model = SemFlow.from_config(config, mesh)
  want = abstract(model, make_optimizer(config), config, mesh)
  use_ema = use_ema and want.ema_params is not None
  skip = checkpoint.not_read
  workdir = storage.resolve(workdir)
  restored = None
  if storage.is_dir(storage.join(workdir, "checkpoints")):  # reading must not create it
    manager = checkpoint.make_manager(workdir, config.train.keep_checkpoints, read_only=True)
    try:
      step = manager.latest_step()
      if step is not None and _is_before_lean_step(_saved_tree(manager, step)):
        target = _before_lean_step_target(model, config, want, use_ema)
      else:
        target = want.replace(
            opt_state=skip(want.opt_state),
            params=skip(want.params) if use_ema else want.params,
            ema_params=want.ema_params if use_ema or want.ema_params is None else skip(
                want.ema_params))
      restored = checkpoint.restore_latest(manager, target, model.checkpoint_record(),
                                           with_data=False)
    finally:
      manager.close()
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints; train first with "
                            f"--mode=train --workdir={workdir}")
  state = restored[0]
  if isinstance(state, dict):  # the old layout: the whole model in params / ema_params
    return state["ema_params" if use_ema else "params"], int(state["step"])
  return state.model_params(ema=use_ema), int(state.step)


def _before_lean_step_target(model, config, want: TrainState, use_ema: bool) -> dict:
  """Restore target of an old-layout checkpoint: the model's parameters from `ema_params` (when
  the config keeps an EMA) or `params`, placeholders for everything else."""
  skip = checkpoint.not_read
  full = want.model_params()  # the whole model, laid out as today
  labels = {k: "frozen" if k in FROZEN else "train" for k in full}
  old_tx = optax.multi_transform({"train": make_optimizer(config), "frozen": optax.set_to_zero()},
                                 labels)
  return {"step": want.step, "rng": want.rng, "skipped": want.skipped,
          "params": skip(full) if use_ema else full,
          "opt_state": skip(jax.eval_shape(old_tx.init, full)),
          "ema_params": full if use_ema else (
              None if want.ema_params is None else skip(full))}
