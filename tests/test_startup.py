"""What a newcomer meets first: imports that leave the process alone, a misspelt override in one
line, and a quiet start on a machine without TPUs although libtpu is installed."""

import os
import subprocess
import sys

import pytest

from semflow_jax import runtime
from tests.conftest import REPO

_IMPORTS = """
import json, os
# The libraries first: some set variables of their own when imported (TF2_BEHAVIOR, ...).
import clu.metric_writers, flax, jax, optax, orbax.checkpoint, tensorflow, tensorflow_datasets
before = dict(os.environ)
import semflow_jax.evaluate, semflow_jax.train, semflow_jax.sample, semflow_jax.checkpoint
import semflow_jax.convert_eval_nets, semflow_jax.main
changed = sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k))
print(json.dumps({"changed": changed, "orbax_registered": semflow_jax.checkpoint._replica_zero_writes}))
"""


def _run(args, env, timeout=300):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        env=env, timeout=timeout)


def test_imports_change_no_environment_and_register_nothing():
  # XLA_FLAGS is set already here (conftest), with the package's flag in it: nothing to add.
  env = {**os.environ, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"}
  proc = _run(["-c", _IMPORTS], env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert proc.stdout.strip().splitlines()[-1] == '{"changed": [], "orbax_registered": false}'


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
