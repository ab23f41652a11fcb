"""The one place that changes the process: JAX / XLA settings that must be made before JAX
starts its backends. Nothing else in semflow_jax sets environment variables or process-wide
options.

- `add_cpu_xla_flags()`: XLA:CPU options (`CPU_XLA_FLAGS`) added to `XLA_FLAGS`. The package's
  `__init__` calls it, so every entry point (the CLI, the tests, the benchmarks, a notebook)
  trains as fast on CPUs as benchmarks/RESULTS.md says; it takes effect only if JAX has not
  started its CPU backend yet, changes nothing on TPUs and GPUs, and a value already in
  `XLA_FLAGS` wins (set `--xla_cpu_experimental_ynn_fusion_type=` yourself to get JAX's default
  back).
- `skip_absent_tpus()`: entry points call it first thing in `main()` (never at import). Where
  libtpu is installed (TPU VMs; also the test environment, for compiling to TPU topologies) JAX
  tries to start the TPU runtime even on a machine without TPUs, which costs time and prints
  warnings, an `E0000 ... INVALID_ARGUMENT` line and sometimes a request to delete libtpu's lock
  file. Without TPU chips on the PCI bus it limits JAX to the CPU; a machine with TPUs or GPUs,
  or a `JAX_PLATFORMS` / `--jax_platforms` chosen by the user, is left alone.
"""

import glob
import importlib.metadata
import os

# XLA:CPU runs convolutions through YNNPACK by default, whose weight gradient of a 3x3
# convolution is much slower than its forward pass (it becomes a convolution with an
# image-sized window); Eigen's convolutions are as fast forward and much faster there
# (benchmarks/RESULTS.md, "Speed", was measured with this flag). Results change only by float
# rounding.
CPU_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
_FLAGS_KNOWN_FROM = (0, 10)  # jaxlib versions whose XLA has these flags (unknown flags abort)
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on the PCI bus (what JAX itself looks for)
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def add_cpu_xla_flags() -> None:
  """Put `CPU_XLA_FLAGS` in front of `XLA_FLAGS`, except flags the user already set there."""
  try:
    version = tuple(int(v) for v in importlib.metadata.version("jaxlib").split(".")[:2])
  except (importlib.metadata.PackageNotFoundError, ValueError):
    return
  if version < _FLAGS_KNOWN_FROM:
    return
  flags = os.environ.get("XLA_FLAGS", "")
  extra = [f"--{name}={value}" for name, value in CPU_XLA_FLAGS.items()
           if f"--{name}=" not in flags]
  if extra:  # in front: XLA stops reading at the first token that is not a flag
    os.environ["XLA_FLAGS"] = " ".join([*extra, flags]).strip()


def has_tpu_chips() -> bool:
  """Google TPU chips on this machine's PCI bus (read from /sys; starts nothing)."""
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def skip_absent_tpus() -> bool:
  """On a machine without TPUs or GPUs, JAX starts only its CPU backend (process-wide, before
  JAX's first use); returns whether it changed anything."""
  import jax
  if (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or
      "JAX_FORCE_TPU_INIT" in os.environ or has_tpu_chips() or
      any(os.path.exists(p) for p in _GPU_DEVICE_FILES)):
    return False
  jax.config.update("jax_platforms", "cpu")
  return True
