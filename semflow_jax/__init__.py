"""SemFlow in JAX/Flax.

Importing the package adds the XLA:CPU options in `CPU_XLA_FLAGS` to `XLA_FLAGS`, so that every
entry point (the CLI, the tests, the benchmarks, a notebook) trains as fast on CPUs as
benchmarks/RESULTS.md says. They take effect only if JAX has not started its CPU backend yet,
change nothing on TPUs and GPUs, and a value already in `XLA_FLAGS` wins (set
`--xla_cpu_experimental_ynn_fusion_type=` yourself to get JAX's default back).
"""

import importlib.metadata
import os

# XLA:CPU runs convolutions through YNNPACK by default, which computes the weight gradient of a
# 3x3 convolution 2-4x slower than the forward pass (it becomes a convolution with an
# image-sized window). Eigen's convolutions are as fast forward and much faster there: the
# default train step takes 22 % less CPU time, the SD-shaped UNet's XX % (benchmarks/RESULTS.md,
# "Where the time goes"). Results change only by float rounding.
CPU_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
_FLAGS_KNOWN_FROM = (0, 10)  # jaxlib versions whose XLA has these flags (unknown flags abort)


def _add_cpu_xla_flags():
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


_add_cpu_xla_flags()
