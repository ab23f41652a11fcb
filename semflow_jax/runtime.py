"""The one place that changes the process: XLA flags, JAX's platforms and its persistent
compilation cache, set by an entry point's one call to `configure_process` before JAX starts a
backend. Importing semflow_jax (any module of it) changes nothing in the process.

Every entry point calls `configure_process` first thing in `main()`: `semflow_jax.main`
(training, evaluation and the file CLI), `semflow_jax.plan`, `semflow_jax.studio`,
`semflow_jax.export`, `semflow_jax.convert`, `semflow_jax.convert_eval_nets`,
`semflow_jax.data.build` and the benchmarks' scripts. A program of your own (a notebook, a
script importing semflow_jax) calls it too, before its first use of JAX, to get the same:

- XLA:CPU options (`CPU_XLA_FLAGS`) added to `XLA_FLAGS`, so CPUs train as fast as
  benchmarks/RESULTS.md says. They take effect only if JAX has not started its CPU backend yet,
  change nothing on TPUs and GPUs, and a value already in `XLA_FLAGS` wins (set
  `--xla_cpu_experimental_ynn_fusion_type=` yourself to get JAX's default back).
- No TPU start-up without TPUs. Where libtpu is installed (TPU VMs; also the test environment,
  for compiling to TPU topologies) JAX tries to start the TPU runtime even on a machine without
  TPUs, which costs time and prints warnings, an `E0000 ... INVALID_ARGUMENT` line and sometimes
  a request to delete libtpu's lock file. Without TPU chips on the PCI bus JAX is limited to the
  CPU; a machine with TPUs or GPUs, or a `JAX_PLATFORMS` / `--jax_platforms` chosen by the user,
  is left alone. `compile_only=True` (the planner) always limits JAX to the CPU and lets libtpu
  load beside other processes (it compiles for TPU topologies and runs nothing).
- The persistent compilation cache, for the entry points that compile a config's programs
  (given `config`): XLA executables are stored in a directory (local or gs://,
  `compilation_cache_dir`) and a restart (preemption, resume, another command on the same
  workdir) loads them instead of compiling again. JAX writes the entries from process 0 only and
  every process reads them; nothing is written before the first compile.

Entry points also set a few variables for the libraries they load (TensorFlow's log level,
Gradio's telemetry) in their `if __name__ == "__main__":` block, before those libraries load.
A job of several processes is watched by `semflow_jax.job`.
"""

import glob
import importlib.metadata
import os
from typing import Optional

import ml_collections
from absl import logging

# XLA:CPU runs convolutions through YNNPACK by default, whose weight gradient of a 3x3
# convolution is much slower than its forward pass (it becomes a convolution with an
# image-sized window); Eigen's convolutions are as fast forward and much faster there
# (benchmarks/RESULTS.md, "Speed", was measured with this flag). Results change only by float
# rounding.
CPU_XLA_FLAGS = {"xla_cpu_experimental_ynn_fusion_type": "-individual_convolution"}
_FLAGS_KNOWN_FROM = (0, 10)  # jaxlib versions whose XLA has these flags (unknown flags abort)
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips on the PCI bus (what JAX itself looks for)
_GPU_DEVICE_FILES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg", "/dev/kfd")


def _add_cpu_xla_flags() -> None:
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


def _skip_absent_tpus() -> bool:
  """On a machine without TPUs or GPUs, JAX starts only its CPU backend (process-wide, before
  JAX's first use); returns whether it changed anything."""
  import jax
  if (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms or  # pyright: ignore[reportAttributeAccessIssue]
      "JAX_FORCE_TPU_INIT" in os.environ or has_tpu_chips() or
      any(os.path.exists(p) for p in _GPU_DEVICE_FILES)):
    return False
  jax.config.update("jax_platforms", "cpu")
  return True


# -- the persistent compilation cache --------------------------------------------------------------
_cache_events = {"hits": 0, "misses": 0}


def _count_cache_event(event: str, **_) -> None:
  if event == "/jax/compilation_cache/cache_hits":
    _cache_events["hits"] += 1
  elif event == "/jax/compilation_cache/cache_misses":
    _cache_events["misses"] += 1


def compilation_cache_dir(config, workdir: Optional[str]) -> Optional[str]:
  """Where executables are cached: `config.compilation_cache` (a directory, local or gs://, or
  'off'); unset, $JAX_COMPILATION_CACHE_DIR if set, else `<workdir>/compilation_cache` when a
  workdir is given (train, eval), else the user's ~/.cache/semflow_jax/jax (sampling: its
  workdir may be someone else's read-only bucket)."""
  from semflow_jax import storage
  setting = config.get("compilation_cache")
  if setting is not None and str(setting).lower() in ("off", "none", "false", ""):
    return None
  path = setting or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  if not path and workdir:
    path = storage.join(workdir, "compilation_cache")
  if not path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "semflow_jax", "jax")
  return storage.resolve(path)


def _enable_compilation_cache(config, workdir: Optional[str]) -> Optional[str]:
  """Turn JAX's persistent compilation cache on (or off) for this process, before anything
  compiles; returns the directory, or None when off."""
  import jax
  path = compilation_cache_dir(config, workdir)
  if path is None:
    jax.config.update("jax_enable_compilation_cache", False)
    logging.info("compilation cache: off")
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  # Sampling's programs compile in well under JAX's default 1 s threshold: cache them all.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  if not _cache_events.get("listening"):
    jax.monitoring.register_event_listener(_count_cache_event)
    _cache_events["listening"] = True
  logging.info("compilation cache: %s", path)
  return path


def compilation_cache_use() -> str:
  """'<hits> hits, <misses> misses' of the persistent cache so far (for logs)."""
  return f"{_cache_events['hits']} hits, {_cache_events['misses']} misses"


def configure_process(config: Optional[ml_collections.ConfigDict] = None,
                      workdir: Optional[str] = None, *, compile_only: bool = False,
                      cpu_devices: Optional[int] = None) -> Optional[str]:
  """Set up this process for JAX (see the module docstring); call once, before JAX starts a
  backend (before `jax.distributed.initialize()` and anything that compiles).

  Args:
    config: the run's config; given, the persistent compilation cache is turned on (or off)
      as `compilation_cache_dir(config, workdir)` says.
    workdir: the run's workdir, where the cache goes by default (training, evaluation); None
      for commands that may only read their workdir (sampling, the studio).
    compile_only: JAX on the CPU only, with libtpu loadable beside other processes (the
      planner compiles for TPU topologies and runs nothing).
    cpu_devices: how many CPU devices JAX makes (the planner's cpu-N topologies).

  Returns:
    The compilation cache's directory, or None when it is off or no config was given.
  """
  _add_cpu_xla_flags()
  if compile_only:
    import jax
    # libtpu takes a lock file for the chips when it loads; compiling touches none.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    jax.config.update("jax_platforms", "cpu")
  else:
    _skip_absent_tpus()
  if cpu_devices is not None:
    import jax
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  return None if config is None else _enable_compilation_cache(config, workdir)
