"""Learning-rate schedules against diffusers' (the official recipes' scheduler), the logged
learning rate, sampling's restore of the parameters alone, and checkpoints of the state layout
before the lean train step."""

from flax import struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import torch
from diffusers.optimization import get_scheduler

from configs import celebamask_hq, cityscapes, coco_stuff, synthetic
from semflow_jax import checkpoint, parallel, state as state_lib
from semflow_jax.semflow import SemFlow

# config.train.schedule -> diffusers' name for the same schedule (SemFlow's train script calls
# diffusers.optimization.get_scheduler(args.lr_scheduler, ...)).
DIFFUSERS_NAMES = {"linear": "linear", "constant": "constant_with_warmup", "cosine": "cosine"}


def _diffusers_rates(name, peak, warmup, total):
  optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=peak)
  schedule = get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)
  rates = []
  for _ in range(total):
    rates.append(optimizer.param_groups[0]["lr"])
    optimizer.step()
    schedule.step()
  return np.array(rates)


@pytest.mark.parametrize("kind", sorted(DIFFUSERS_NAMES))
def test_schedules_match_diffusers(kind):
  config = synthetic.get_config("tiny")
  config.train.update(schedule=kind, learning_rate=3e-4, warmup_steps=7, num_steps=40)
  ours = np.array([state_lib.learning_rate_schedule(config)(step) for step in range(40)])
  np.testing.assert_allclose(ours, _diffusers_rates(DIFFUSERS_NAMES[kind], 3e-4, 7, 40),
                             rtol=1e-5, atol=1e-12)


def test_recipes_use_the_official_schedules():
  got = {m.__name__.split(".")[-1]: (c.train.schedule, c.train.warmup_steps, c.train.learning_rate)
         for m in (coco_stuff, celebamask_hq, cityscapes) for c in [m.get_config()]}
  assert got == {"coco_stuff": ("constant", 10_000, 1e-5), "celebamask_hq": ("linear", 500, 2e-5),
                 "cityscapes": ("linear", 500, 5e-5)}


def test_unknown_schedule_is_refused_by_key():
  config = synthetic.get_config("tiny")
  config.train.schedule = "cosine_restarts"
  with pytest.raises(ValueError, match="config.train.schedule"):
    state_lib.learning_rate_schedule(config)


def test_logged_learning_rate_is_the_applied_one():
  """The optimiser's count, not state.step, drives the schedule: after a skipped (non-finite)
  update the two differ, and the logged rate must be the one the next update applies."""
  config = synthetic.get_config("tiny")
  config.train.update(schedule="linear", warmup_steps=4, num_steps=20, learning_rate=1.0,
                      grad_clip=1e9, weight_decay=0.0)
  tx, schedule = state_lib.make_optimizer(config), state_lib.learning_rate_schedule(config)
  params = {"unet": {"w": jax.numpy.zeros(3)}}
  opt_state = tx.init(params)
  grads = {"unet": {"w": jax.numpy.ones(3)}}
  for step in range(6):
    logged = float(state_lib.applied_learning_rate(schedule, opt_state))
    # Adam's first step moves each weight by -lr (m / sqrt(v) = 1): the rate really applied.
    updates, opt_state = tx.update(grads, opt_state, params)
    if step > 0:  # from the second step on Adam's ratio is no longer exactly 1
      continue
    np.testing.assert_allclose(-np.asarray(updates["unet"]["w"]), logged, rtol=1e-6)  # pyright: ignore[reportCallIssue]
  assert float(state_lib.applied_learning_rate(schedule, opt_state)) == pytest.approx(
      float(schedule(6)))


def test_sampling_restores_only_the_parameters_it_uses(tmp_path, monkeypatch):
  config = synthetic.get_config("tiny")
  config.train.ema_decay = 0.5
  mesh = parallel.make_mesh(config, jax.devices()[:2])
  model, tx = SemFlow.from_config(config, mesh), state_lib.make_optimizer(config)
  state = state_lib.create(model, tx, config, mesh)
  # Distinct EMA and params, so reading the wrong copy shows.
  state = state.replace(ema_params=jax.tree.map(lambda x: x + 1.0, state.ema_params),
                        step=state.step + 3)
  manager = checkpoint.make_manager(str(tmp_path), 2, async_save=False)
  checkpoint.save(manager, 3, state, {"position": 0}, model.checkpoint_record())
  manager.close()

  read = []
  deserialize = ocp.type_handlers.ArrayHandler.deserialize

  async def spy(self, infos, args=None):
    read.extend(str(info.name) for info in infos)
    return await deserialize(self, infos, args)

  monkeypatch.setattr(ocp.type_handlers.ArrayHandler, "deserialize", spy)
  params, step = state_lib.load_params(config, str(tmp_path), mesh)
  assert step == 3
  expected = jax.device_get(state.ema_params)
  for got, want in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(got, want)
  # The EMA copy and the scalars (step, rng, skipped count); no optimiser state, no raw params.
  unwanted = [name for name in read if name.startswith(("opt_state", "params"))]
  assert not unwanted, unwanted[:5]
  assert sum(name.startswith("ema_params") for name in read) == len(jax.tree.leaves(expected))


@struct.dataclass
class _StateBeforeLeanStep:
  """The TrainState of semflow_jax before the lean step (issue 17): the frozen VAE and text
  embedding inside params and the EMA, an optax.multi_transform optimiser over all of them."""
  step: jax.Array
  params: dict
  opt_state: object
  ema_params: object
  rng: jax.Array
  skipped: jax.Array


def test_checkpoints_of_the_state_before_the_lean_step(tmp_path):
  """Sampling and evaluation still read them; resuming training is refused in one line."""
  from configs import sd15
  config = sd15.get_config("tiny")
  config.train.ema_decay = 0.5
  mesh = parallel.make_mesh(config, jax.devices()[:2])
  model = SemFlow.from_config(config, mesh)
  params = jax.jit(model.init)(jax.random.PRNGKey(0))  # jitted: op by op compiles every op
  labels = {k: "frozen" if k in ("vae", "context") else "train" for k in params}
  old_tx = optax.multi_transform({"train": state_lib.make_optimizer(config),
                                  "frozen": optax.set_to_zero()}, labels)
  # Distinct from params, so reading the wrong copy shows.
  ema = jax.jit(lambda p: jax.tree.map(lambda x: x + 1.0, p))(params)
  opt_state = jax.jit(old_tx.init)(params)
  old = _StateBeforeLeanStep(jnp.asarray(7, jnp.int32), params, opt_state, ema,
                             jax.random.PRNGKey(1), jnp.zeros((), jnp.int32))
  manager = checkpoint.make_manager(str(tmp_path), 2, async_save=False)
  checkpoint.save(manager, 7, old, {"position": 0}, model.checkpoint_record())

  with pytest.raises(checkpoint.IncompatibleCheckpointError) as error:
    state_lib.check_resumable(manager)
  manager.close()
  message = str(error.value)
  assert "\n" not in message and f"{tmp_path}/checkpoints/7" in message
  assert "before the lean train step" in message and "new --workdir" in message

  restored, step = state_lib.load_params(config, str(tmp_path), mesh)
  assert step == 7 and set(restored) == {"unet", "vae", "context"}
  for got, want in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(ema),
                       strict=True):
    np.testing.assert_array_equal(got, want)


def test_lean_checkpoints_resume_and_hold_the_frozen_parts_once(tmp_path):
  from configs import sd15
  config = sd15.get_config("tiny")
  mesh = parallel.make_mesh(config, jax.devices()[:2])
  model, tx = SemFlow.from_config(config, mesh), state_lib.make_optimizer(config)
  state = state_lib.create(model, tx, config, mesh)
  manager = checkpoint.make_manager(str(tmp_path), 2, async_save=False)
  checkpoint.save(manager, 3, state.replace(step=state.step + 3), {"position": 0},
                  model.checkpoint_record())
  state_lib.check_resumable(manager)  # no error
  restored, _ = checkpoint.restore_latest(manager, state_lib.abstract(model, tx, config, mesh),  # pyright: ignore[reportGeneralTypeIssues]
                                          model.checkpoint_record())
  manager.close()
  assert int(restored.step) == 3 and restored.ema_params is None
  for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(state.replace(step=3)),
                       strict=True):
    np.testing.assert_array_equal(got, want)
  params, step = state_lib.load_params(config, str(tmp_path), mesh)
  assert step == 3
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(state.model_params()),
                       strict=True):
    np.testing.assert_array_equal(got, want)
