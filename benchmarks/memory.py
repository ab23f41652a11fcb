"""Per-device memory of a config's training state and train step, without allocating anything.

  python benchmarks/memory.py --config=configs/synthetic.py --devices=8,16,64 \
      --batch_per_device=16 --compile_devices=1,8

1. Parameters + optimiser state (+ EMA) per device, from `jax.eval_shape` of the state and the
   sharding rules in `semflow_jax.parallel`, under data parallel (data=N, fsdp=1: replicated)
   and FSDP (data=1, fsdp=N) for every N in --devices.
2. The compiled train step's `memory_analysis()` per device (arguments, outputs, temporaries;
   peak = arguments + outputs - aliased (donated) + temporaries) for --batch_per_device examples
   per device on meshes of --compile_devices devices, data parallel and FSDP, with remat off and
   on when the config has the key --remat_key (a bool). The step is lowered from
   ShapeDtypeStructs and compiled for fake CPU devices: no parameters exist, no data is read.
   XLA:CPU's buffer assignment is an estimate of an accelerator's (fusion and layouts differ).
3. Which HBM sizes (--hbm_gib) that peak fits, with --headroom reserved for the runtime.

Config overrides work as in semflow_jax.main: --config.model.base_channels=128.
"""

import os
import sys


def _early_int_list(name, default):
  for arg in sys.argv[1:]:
    if arg.startswith(f"--{name}="):
      return [int(x) for x in arg.split("=", 1)[1].split(",") if x]
  return default


# Fake enough CPU devices before JAX initialises its backend.
_NEEDED = max(_early_int_list("devices", [8]) + _early_int_list("compile_devices", [1]))
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={_NEEDED}").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from semflow_jax import parallel, state as state_lib  # noqa: E402
from semflow_jax.semflow import SemFlow  # noqa: E402
from semflow_jax.step import lower_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/synthetic.py", "Config file.")
_DEVICES = flags.DEFINE_list("devices", ["8"], "Mesh sizes for the state bytes table.")
_COMPILE_DEVICES = flags.DEFINE_list("compile_devices", ["1"],
                                     "Mesh sizes to compile the train step for.")
_BATCH = flags.DEFINE_integer("batch_per_device", 16, "Examples per device per step.")
_REMAT_KEY = flags.DEFINE_string("remat_key", "model.remat",
                                 "Bool config key switching remat; varied when the config has it.")
_HBM = flags.DEFINE_list("hbm_gib", ["16", "32", "95"], "Accelerator memory sizes to check.")
_HEADROOM = flags.DEFINE_float("headroom", 0.9, "Fraction of HBM usable by the program.")

GIB = 2**30


def _mesh(config, n, layout):
  config.mesh.data, config.mesh.fsdp = (n, 1) if layout == "data parallel" else (1, n)
  return parallel.make_mesh(config, jax.devices()[:n])


def state_table(config):
  model, tx = SemFlow.from_config(config), state_lib.make_optimizer(config)
  shapes = jax.eval_shape(state_lib._init_fn(model, tx, config), jax.random.PRNGKey(0))
  n_params = sum(x.size for x in jax.tree.leaves(shapes.params))
  param_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(shapes.params))
  print(f"UNet parameters: {n_params:,} ({param_bytes / GIB:.3f} GiB); train state: params, "
        f"AdamW mu and nu{', EMA' if shapes.ema_params is not None else ''}; fsdp_min_size "
        f"{config.mesh.get('fsdp_min_size', parallel.DEFAULT_FSDP_MIN_SIZE)}\n")
  print("| devices | layout | params GiB/device | train state GiB/device |")
  print("| --- | --- | --- | --- |")
  for n in (int(d) for d in _DEVICES.value):
    for layout in ("data parallel", "fsdp"):
      mesh = _mesh(config, n, layout)
      shardings = parallel.state_shardings(shapes, mesh, config)
      total = parallel.bytes_per_device(shapes, shardings)
      params = parallel.bytes_per_device(shapes.params, shardings.params)
      print(f"| {n} | {layout} | {params / GIB:.3f} | {total / GIB:.3f} |")
  print()


def compiled_table(config):
  remat_variants = [None]
  section, _, name = _REMAT_KEY.value.partition(".")
  if section in config and name in config[section]:
    remat_variants = [False, True]
  else:
    print(f"(config has no {_REMAT_KEY.value}: remat not varied)\n")
  hbm = [float(h) for h in _HBM.value]
  size = SemFlow.from_config(config).image_size
  print(f"Compiled train step, {_BATCH.value} examples of {size[0]}x{size[1]} per device "
        f"(memory_analysis, XLA:CPU):\n")
  print("| devices | layout | remat | args GiB | temp GiB | peak GiB | compile s | "
        + " | ".join(f"fits {h:g} GiB" for h in hbm) + " |")
  print("| --- " * (7 + len(hbm)) + "|")
  for n in (int(d) for d in _COMPILE_DEVICES.value):
    for layout in (("data parallel",) if n == 1 else ("data parallel", "fsdp")):
      for remat in remat_variants:
        if remat is not None:
          config[section][name] = remat
        mesh = _mesh(config, n, layout)
        model, tx = SemFlow.from_config(config), state_lib.make_optimizer(config)
        abstract_state = state_lib.abstract(model, tx, config, mesh)
        b = _BATCH.value * n
        batch = {"image": ((b, *size, 3), jnp.uint8), "label": ((b, *size, 1), jnp.uint8)}
        start = time.time()
        compiled = lower_train_step(model, tx, config, mesh, abstract_state, batch).compile()
        seconds = time.time() - start
        m = compiled.memory_analysis()
        peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                + m.temp_size_in_bytes)
        fits = ["yes" if peak <= _HEADROOM.value * h * GIB else "no" for h in hbm]
        print(f"| {n} | {layout} | {'-' if remat is None else ('on' if remat else 'off')} | "
              f"{m.argument_size_in_bytes / GIB:.3f} | {m.temp_size_in_bytes / GIB:.3f} | "
              f"{peak / GIB:.3f} | {seconds:.0f} | " + " | ".join(fits) + " |", flush=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  config.train.batch_size = _BATCH.value  # only its divisibility is checked here
  print(f"JAX {jax.__version__}, {jax.device_count()} fake CPU devices\n")
  state_table(config)
  compiled_table(config)


if __name__ == "__main__":
  from semflow_jax import runtime
  runtime.configure_process()  # XLA:CPU flags, no TPU start-up without TPUs
  app.run(main)
