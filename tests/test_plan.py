"""The planner compiles a run's programs for a TPU slice (libtpu on this CPU) or fake CPU
devices and reports their memory per chip."""

import json
import os
import subprocess
import sys

import pytest

from configs import sd15
from semflow_jax import parallel, plan, state as state_lib
from semflow_jax.semflow import SemFlow
from tests.conftest import REPO


def _check_program(report, name):
  r = report["programs"][name]
  assert r["peak_bytes"] == (r["argument_bytes"] + r["output_bytes"] - r["alias_bytes"]
                             + r["temp_bytes"] + r["code_bytes"])
  assert r["argument_bytes"] >= r["state_bytes"] > 0
  assert r["temp_bytes"] > 0 and r["flops"] > 0
  assert r["fits"] == (r["peak_bytes"] <= (1 - report["headroom"]) * report["hbm_bytes"])
  return r


def test_topology_names():
  assert plan.tpu_slice("v5e-16")["topology_name"] == "v5e:4x4"
  assert plan.tpu_slice("v4-32")["topology_name"] == "v4:2x2x4"      # 32 cores, 16 chips
  assert plan.tpu_slice("v4-32")["chip_config_name"] == "megacore"
  assert plan.tpu_slice("v5p-8")["topology_name"] == "v5p:2x2x1"
  for bad in ("v5e-12", "v4-5", "h100-8"):
    with pytest.raises(ValueError, match="--topology"):
      plan.tpu_slice(bad)


def test_planner_on_fake_cpu_devices_needs_no_libtpu(tmp_path):
  out = tmp_path / "plan.json"
  env = {**os.environ, "PYTHONPATH": REPO}
  env.pop("JAX_PLATFORMS", None)  # the planner sets it itself
  run = subprocess.run(
      [sys.executable, "-m", "semflow_jax.plan", "--config=configs/sd15.py:tiny",
       "--topology=cpu-8", "--programs=train_step,segment", f"--json={out}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert run.returncode == 0, run.stderr[-3000:]
  assert "| train_step |" in run.stdout and "| segment |" in run.stdout
  report = json.loads(out.read_text())
  assert report["topology"] == "cpu-8" and report["chips"] == 8
  train = _check_program(report, "train_step")
  _check_program(report, "segment")
  # The state the step takes is the train state laid out by the config's mesh.
  config = sd15.get_config("tiny")
  mesh = parallel.make_mesh(config)
  model, tx = SemFlow.from_config(config, mesh), state_lib.make_optimizer(config)
  abstract = state_lib.abstract(model, tx, config, mesh)
  import jax
  assert train["state_bytes"] == parallel.bytes_per_device(
      abstract, jax.tree.map(lambda x: x.sharding, abstract))
  assert {a["kernel"] for a in train["attention"]} == {"einsum"}


def test_planner_bad_topology_is_one_line(tmp_path):
  run = subprocess.run([sys.executable, "-m", "semflow_jax.plan", "--config=configs/sd15.py:tiny",
                        "--topology=v5e-12"], cwd=REPO, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
  assert run.returncode == 2
  assert run.stderr.strip().splitlines()[-1].startswith("error: --topology='v5e-12'")


def test_planner_compiles_the_train_step_and_segment_for_a_tpu_slice():
  """libtpu's compiler on this CPU: the tiny SD model at 32x32 (256 latent tokens) with splash
  attention, on a v5e 2x2 slice."""
  config = sd15.get_config("tiny")
  config.data.image_size = 32
  config.model.attention = "splash"
  config.eval.batch_size = 4
  report = plan.plan(config, plan.get_topology("v5e-4"), ("train_step", "segment"))
  assert report["platform"] == "tpu" and report["hbm_bytes"] == 16 * 2**30
  train = _check_program(report, "train_step")
  _check_program(report, "segment")
  assert train["fits"] and train["batch_per_chip"] == 4
  kernels = {(a["q_len"], a["kv_len"]): a["kernel"] for a in train["attention"]}
  assert kernels[(256, 256)] == "splash"      # UNet self-attention
  assert kernels[(256, 8)] == "dot_product"   # cross-attention over 8 context tokens
