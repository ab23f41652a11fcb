"""Fake 8 CPU devices before JAX is imported anywhere, and share small fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

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
