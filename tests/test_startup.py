"""What a newcomer meets first: imports that leave the process alone, a misspelt override in one
line, and a quiet start on a machine without TPUs although libtpu is installed."""

import json
import os
import subprocess
import sys

import pytest

from semflow_jax import runtime
from tests.conftest import REPO

# Every module a program may import (not the entry points' __main__ blocks).
_SEMFLOW = ("semflow_jax.train, semflow_jax.plan, semflow_jax.sample, semflow_jax.sample_many, "
            "semflow_jax.studio.app, semflow_jax.evaluate, semflow_jax.checkpoint, "
            "semflow_jax.convert, semflow_jax.convert_eval_nets, semflow_jax.main, "
            "semflow_jax.export, semflow_jax.data, semflow_jax.data.build, semflow_jax.step, "
            "semflow_jax.runtime, semflow_jax.job")
# The libraries those import; some set variables of their own when imported (TF2_BEHAVIOR,
# TPU_LIBRARY_PATH, ...): those changes are theirs, not semflow_jax's.
_LIBRARIES = ("clu.metric_writers, flax, gradio, jax, ml_collections, optax, orbax.checkpoint, "
              "PIL.Image, tensorflow, tensorflow_datasets")
_CHANGES = """
import json, os
before = dict(os.environ)
import {modules}
print(json.dumps({{k: os.environ.get(k) for k in sorted(set(before) | set(os.environ))
                  if before.get(k) != os.environ.get(k)}}))
"""
_REGISTERED = """
import clu.metric_writers, flax, jax, optax, orbax.checkpoint, tensorflow, tensorflow_datasets
import {modules}
print(semflow_jax.checkpoint._replica_zero_writes)
"""

# The compiled step and the planner compile without the input pipeline: no TensorFlow, no tfds.
_LEAN_IMPORTS = """
import sys
import semflow_jax.plan, semflow_jax.step
print(sorted(m for m in ("tensorflow", "tensorflow_datasets") if m in sys.modules))
"""


def _run(args, env, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        env=env, timeout=timeout)


def _changes(modules: str, env: dict) -> dict:
  proc = _run(["-c", _CHANGES.format(modules=modules)], env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("xla_flags", [None, "--xla_force_host_platform_device_count=2"])
def test_importing_semflow_jax_changes_only_what_its_libraries_change(xla_flags):
  # The entry points set XLA_FLAGS (runtime.configure_process); importing sets nothing.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  if xla_flags is not None:
    env["XLA_FLAGS"] = xla_flags
  ours = _changes(_SEMFLOW, env)
  theirs = _changes(_LIBRARIES, env)
  assert "XLA_FLAGS" not in ours, ours
  assert {k: v for k, v in ours.items() if theirs.get(k) != v} == {}, (ours, theirs)


def test_imports_register_nothing_with_orbax():
  proc = _run(["-c", _REGISTERED.format(modules=_SEMFLOW)], dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "False"


def test_the_step_and_the_planner_import_neither_tensorflow_nor_tfds():
  proc = _run(["-c", _LEAN_IMPORTS], dict(os.environ))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_a_misspelt_override_is_one_line_with_the_suggestion():
  proc = _run(["-m", "semflow_jax.main", "--config=configs/synthetic.py:tiny",
               "--workdir=/nonexistent", "--config.train.num_stepz=3"], dict(os.environ))
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: --config.train.num_stepz=3: the config has no key train.num_stepz (did you mean "
      "train.num_steps?)")
  assert "Traceback" not in proc.stderr


@pytest.mark.skipif(runtime.has_tpu_chips(), reason="this machine has TPUs: JAX should use them")
def test_no_tpu_start_up_where_libtpu_is_installed_but_no_tpu_is(tmp_path):
  import importlib.util
  assert importlib.util.find_spec("libtpu"), "the test extra installs libtpu; this test needs it"
  (tmp_path / "checkpoints").mkdir()  # a workdir with nothing to sample from yet
  env = {k: v for k, v in os.environ.items()
         if k not in ("JAX_PLATFORMS", "ALLOW_MULTIPLE_LIBTPU_LOAD")}  # as a user has it
  proc = _run(["-m", "semflow_jax.main", "--config=configs/synthetic.py:tiny",
               f"--workdir={tmp_path}", "--mode=segment", "--input=docs/images/edit.png",
               f"--output={tmp_path / 'mask.png'}"], env)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1] == f"error: no checkpoint in {tmp_path}/checkpoints; train first with " \
                      f"--mode=train --workdir={tmp_path}"
  noise = [l for l in lines if any(w in l.replace(str(tmp_path), "<workdir>") for w in (
      "tpu", "TPU", "E0000", "read only", "oneDNN", "Traceback"))]
  assert not noise, "\n".join(noise)
  assert any("devices: [CpuDevice(id=0)" in l for l in lines)
