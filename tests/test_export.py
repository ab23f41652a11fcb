"""The trained UNet as a diffusers folder: diffusers' own `from_pretrained` reads it and gives
the project's velocity (tiny SD config, configs/sd15.py:tiny)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch

from configs import sd15, synthetic
from semflow_jax import checkpoint, export, parallel, state as state_lib
from semflow_jax.semflow import SemFlow
from tests import sd_fixtures as fx
from tests.conftest import REPO


def _checkpointed_run(workdir, config):
  """A workdir as training leaves it (config.json, a checkpoint at step 3) with random weights,
  the EMA different from the trained parameters."""
  mesh = parallel.make_mesh(config)
  model = SemFlow.from_config(config, mesh)
  tx = state_lib.make_optimizer(config)
  train_state = state_lib.create(model, tx, config, mesh)
  rng = np.random.default_rng(1)
  noisy = lambda tree, scale: jax.tree.map(
      lambda p: np.asarray(p) + scale * rng.normal(size=p.shape).astype(np.float32), tree)
  trained = {"unet": noisy(train_state.params["unet"], 0.05)}
  frozen = {**train_state.frozen, "context": noisy(train_state.frozen["context"], 1.0)}
  ema = {"unet": noisy(trained["unet"], 0.05)}
  train_state = train_state.replace(params=trained, frozen=frozen, ema_params=ema,
                                    step=train_state.step + 3)
  manager = checkpoint.make_manager(str(workdir), 2, async_save=False)
  checkpoint.save(manager, 3, train_state, {"position": 3}, model.checkpoint_record())
  manager.wait_until_finished()
  manager.close()
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  return model, jax.device_get({**frozen, **trained}), jax.device_get({**frozen, **ema})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  config = sd15.get_config("tiny")
  config.train.ema_decay = 0.99
  workdir = tmp_path_factory.mktemp("sd_run") / "run"
  return (config, str(workdir)) + _checkpointed_run(str(workdir), config)


def _velocities(model, params, exported_dir, z, t):
  from diffusers import UNet2DConditionModel
  unet = UNet2DConditionModel.from_pretrained(exported_dir).eval()
  context = torch.from_numpy(np.load(os.path.join(exported_dir, export.CONTEXT_FILE)))
  with torch.no_grad():
    theirs = unet(torch.from_numpy(fx.nchw(z)), torch.from_numpy(1000.0 * t),
                  encoder_hidden_states=context.expand(len(z), -1, -1)).sample.numpy()
  ours = fx.nchw(jax.jit(model.velocity)(params, z, t))
  return ours, theirs


def test_the_exported_unet_gives_the_projects_velocity_in_diffusers(run, tmp_path):
  config, workdir, model, params, ema = run
  # The README's command (`python -m semflow_jax.export --workdir=runs/celeba
  # --output=exported/celeba_unet`) on this run.
  out = str(tmp_path / "unet")
  proc = subprocess.run(
      [sys.executable, "-m", "semflow_jax.export", f"--workdir={workdir}", f"--output={out}"],
      cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert sorted(os.listdir(out)) == sorted(["config.json", export.WEIGHTS_FILE, export.CONTEXT_FILE,
                                            export.CONVENTIONS_FILE, "README.md"])
  rng = np.random.default_rng(0)
  z = rng.normal(size=(2, *model.latent_shape)).astype(np.float32)
  t = np.array([0.2, 0.9], np.float32)
  ours, theirs = _velocities(model, ema, out, z, t)  # the EMA by default
  assert np.abs(theirs).max() > 0.1  # a real signal
  np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
  trained, _ = _velocities(model, params, out, z, t)
  assert np.abs(trained - ours).max() > 1e-3  # the EMA, not the trained parameters

  info = json.load(open(os.path.join(out, export.CONVENTIONS_FILE)))
  assert info["source"] == {"workdir": workdir, "step": 3, "weights": "ema"}
  assert info["timestep_scale"] == 1000.0 and info["latents"]["scaling_factor"] == 0.18215
  assert info["palette"]["anchors_unit"] == [list(c) for c in model.palette.colours]
  assert info["num_classes"] == config.data.num_classes
  assert info["perturbation"]["amplitude_unit"] == pytest.approx(
      model.perturbation * model.palette.half_spacing)


def test_noema_exports_the_trained_parameters_and_converts_back(run, tmp_path):
  config, workdir, model, params, _ = run
  out = export.export(workdir, str(tmp_path / "unet"), ema=False)
  rng = np.random.default_rng(1)
  z = rng.normal(size=(1, *model.latent_shape)).astype(np.float32)
  t = np.array([0.5], np.float32)
  ours, theirs = _velocities(model, params, out, z, t)
  np.testing.assert_allclose(theirs, ours, atol=1e-5, rtol=0)
  # The converter reads the export back into the same parameters.
  from semflow_jax import convert
  _, unet_params = convert.load_diffusers_unet(out)
  jax.tree.map(np.testing.assert_array_equal, unet_params, jax.device_get(params["unet"]))


def test_exports_are_refused_in_one_line(run, tmp_path, tfds_dir):
  config, workdir, *_ = run
  with pytest.raises(export.ExportError, match="already exists"):
    export.export(workdir, str(tmp_path))
  small = synthetic.get_config("tiny")
  small_run = tmp_path / "small"
  os.makedirs(small_run)
  with open(small_run / "config.json", "w") as f:
    f.write(small.to_json_best_effort())
  proc = subprocess.run(
      [sys.executable, "-m", "semflow_jax.export", f"--workdir={small_run}",
       f"--output={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, "XLA_FLAGS": ""})
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: {small_run} holds the small pixel-space UNet (config.model.unet='small'), which "
      "has no diffusers equivalent; only SD UNets (config.model.unet='sd', e.g. configs/sd15.py "
      "and the dataset recipes) export as UNet2DConditionModel")
  assert not os.path.exists(tmp_path / "out")
