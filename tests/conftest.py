"""Fake 8 CPU devices before JAX is imported anywhere, and share small fixtures."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# CPU only, also where libtpu is installed (the test extra has it, for the TPU compiler): JAX
# then never loads the TPU runtime at start-up, which on a machine without TPUs costs half a
# second and prints warnings in every process. TPU topologies for compiling are still there
# (jax.experimental.topologies loads libtpu on demand).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests only compile for TPU topologies: let several processes (parallel test runs, a planner
# beside them) load libtpu, which otherwise holds a lock file for the chips.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# The tests run each program for a few steps, so compiling is most of their time: JAX's own
# switch for that case (XLA's backend optimisation level 0, LLVM's expensive passes off) makes
# the suite's XLA:CPU compiles about a third faster (tests/test_step.py's two SD-shaped steps:
# 254 s -> 162 s) and changes no result the tests check. Inherited by the processes they start.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# One persistent compilation cache for this session, inherited by the subprocesses the tests
# start: the same tiny train step is compiled once, not once per process.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache = tempfile.mkdtemp(prefix="semflow_jax_test_cache_")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache

import pytest

from semflow_jax import runtime

# As an entry point does (importing semflow_jax changes nothing): the XLA:CPU flags, in this
# process and the subprocesses the tests start with this environment.
runtime.configure_process()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def tfds_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture()
def tiny_config(tfds_dir):
  from configs import synthetic
  config = synthetic.get_config("tiny")
  config.data.tfds_data_dir = tfds_dir
  return config


def free_port() -> int:
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_together(commands, envs, log_dir, timeout=500):
  """Start one process per command at once (the peers of one job); [(process, output)].

  Output goes to files, not pipes: a process blocked on a full pipe stalls its peer's
  collectives. A process still running after `timeout` seconds is killed.
  """
  import subprocess
  logs = [open(os.path.join(log_dir, f"process_{i}.log"), "w+") for i in range(len(commands))]
  procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
           for cmd, env, log in zip(commands, envs, logs)]
  try:
    for p in procs:
      p.wait(timeout=timeout)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = []
  for log in logs:
    log.seek(0)
    outputs.append(log.read())
    log.close()
  return list(zip(procs, outputs))


# The files that take longest (`--durations` of a full run), first: pytest-xdist (--dist
# loadfile) hands files to the workers in collection order, so the long ones start at once and
# the short ones fill in around them instead of one long file running alone at the end.
LONGEST_FIRST = ("test_rehearsal.py", "test_resilience.py", "test_latents.py", "test_evaluate.py",
                 "test_gcs.py", "test_step.py", "test_controls.py", "test_state.py",
                 "test_sd_models.py", "test_plan.py", "test_end_to_end.py", "test_sharding.py",
                 "test_studio.py")


def pytest_configure(config):
  # pytest-xdist would otherwise order the files by their number of tests (--loadscope-reorder).
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within files
