"""Will a run fit the chips? Compile its programs for a TPU slice on this machine and report.

  python -m semflow_jax.plan --config=configs/celebamask_hq.py --topology=v5e-16
  python -m semflow_jax.plan --config=configs/cityscapes.py --topology=v4-32 --json=plan.json
  python -m semflow_jax.plan --config=configs/sd15.py:tiny --topology=cpu-8   # no libtpu needed

For TPU topologies (v5e-N and v6e-N: N chips; v4-N and v5p-N: N TensorCores, two per chip)
libtpu's compiler builds the exact programs a run executes, for devices that need not exist
(`jax.experimental.topologies`; `pip install -r requirements-tpu.lock` or `jax[tpu]`):

- train_step: `train.lower_train_step`, the step `--mode=train` compiles (global batch
  train.batch_size, the config's mesh, FSDP, remat, gradient accumulation, state donated);
- segment, synthesize: `programs.Programs`' programs that `--mode=eval` and training-time
  evaluation run (at eval.batch_size rounded up to the chips, or --infer_batch; --infer_batch=1
  is `--mode=segment` on one file), taking the parameters alone.

Per chip it prints the train state (or parameters), XLA's argument / output / temporary bytes,
the peak (arguments + outputs - donated + temporaries + program code), the chip's HBM, whether
the peak fits in HBM less --headroom, the FLOPs of one call per chip (XLA's count, which cannot
see inside Pallas kernels: the forward matmuls of splash layers are added, their backward is
not), and which attention kernel every attention layer uses. `--json=FILE` writes the same. `cpu-N` compiles for N fake CPU devices
(XLA:CPU's buffer assignment: an estimate of an accelerator's), with the host's memory split
over them as "HBM". The planner runs with JAX_PLATFORMS=cpu (it compiles, never runs) and lets
several processes load libtpu at once. Config overrides work as in semflow_jax.main.
"""

import os
import re
import sys


def _early_flag(name: str, default: str) -> str:
  for arg in sys.argv[1:]:
    if arg.startswith(f"--{name}="):
      return arg.split("=", 1)[1]
  return default


# Before JAX initialises: CPU only (compile-only TPU devices come from libtpu on demand), and
# enough fake CPU devices for --topology=cpu-N.
os.environ["JAX_PLATFORMS"] = "cpu"
# libtpu lets one process at a time open it (a lock file for the chips); compiling touches none.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
_CPU = re.fullmatch(r"cpu-(\d+)", _early_flag("topology", ""))
if _CPU:
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={_CPU.group(1)}").strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import dataclasses  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from semflow_jax import parallel, programs as programs_lib, state as state_lib, train  # noqa: E402
from semflow_jax.models import sd_layers  # noqa: E402
from semflow_jax.semflow import SemFlow  # noqa: E402

GIB = 2**30
PROGRAMS = ("train_step", "segment", "synthesize")

# HBM per JAX device (one chip; v4 and v5p chips are one megacore device).
HBM_GIB = {"v4": 32, "v5e": 16, "v5p": 95, "v6e": 32}
# Chips of a v5e / v6e slice laid out in 2D, of a v4 / v5p slice in 3D (the shapes Cloud TPU
# sells), and the chips each host holds.
_GRID_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16",
            256: "16x16"}
_GRID_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8",
            256: "4x8x8", 512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}
_ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass
class Topology:
  name: str
  platform: str
  devices: list
  hbm_bytes: int


def tpu_slice(name: str) -> dict:
  """'v5e-16' -> keyword arguments of jax.experimental.topologies.get_topology_desc."""
  match = re.fullmatch(r"(v5litepod|v5e|v6e|v4|v5p)-(\d+)", name)
  if not match:
    raise ValueError(f"--topology={name!r}: expected v5e-N, v6e-N (N chips), v4-N, v5p-N "
                     "(N TensorCores) or cpu-N")
  kind, n = _ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
  if kind in ("v5e", "v6e"):
    if n not in _GRID_2D:
      raise ValueError(f"--topology={name!r}: {kind} slices have {sorted(_GRID_2D)} chips")
    bounds = (1, 1, 1) if n == 1 else (2, 4, 1) if n == 8 else (2, 2, 1)
    return dict(topology_name=f"{kind}:{_GRID_2D[n]}", chip_config_name="default",
                chips_per_host_bounds=bounds, num_slices=1, wrap=(False, False, False))
  if n % 2 or n // 2 not in _GRID_3D:
    raise ValueError(f"--topology={name!r}: {kind}-N counts TensorCores (2 per chip); N in "
                     f"{sorted(2 * c for c in _GRID_3D)}")
  return dict(topology_name=f"{kind}:{_GRID_3D[n // 2]}", chip_config_name="megacore",
              chips_per_host_bounds=(2, 2, 1), num_slices=1, wrap=(False, False, False))


def get_topology(name: str, hbm_gib: float = 0.0) -> Topology:
  """Devices to compile for: a TPU slice's (from libtpu, no TPU needed) or fake CPU devices."""
  cpu = re.fullmatch(r"cpu-(\d+)", name)
  if cpu:
    n = int(cpu.group(1))
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise ValueError(f"--topology={name}: only {len(devices)} CPU devices (set "
                       f"--xla_force_host_platform_device_count={n} in XLA_FLAGS before JAX starts)")
    host = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Topology(name, "cpu", devices[:n], int(hbm_gib * GIB) if hbm_gib else host // n)
  kwargs = tpu_slice(name)
  try:
    from jax.experimental import topologies
    devices = topologies.get_topology_desc(platform="tpu", **kwargs).devices
  except Exception as e:  # no libtpu, or a libtpu that does not know this chip
    raise RuntimeError(f"--topology={name}: cannot get TPU devices to compile for ({e}); "
                       "install libtpu: pip install -r requirements-tpu.lock") from e
  kind = kwargs["topology_name"].split(":")[0]
  return Topology(name, "tpu", list(devices), int((hbm_gib or HBM_GIB[kind]) * GIB))


def train_batch_spec(model: SemFlow, config) -> dict:
  """{key: (global shape, dtype)} of a training batch: uint8 images and label maps."""
  b, (h, w) = config.train.batch_size, model.image_size
  return {"image": ((b, h, w, 3), np.uint8), "label": ((b, h, w, 1), np.uint8)}


def inference_batch(config, mesh, infer_batch: int) -> int:
  """The batch evaluation runs at (eval.batch_size rounded up to the devices), or `infer_batch`."""
  n = mesh.devices.size
  return infer_batch if infer_batch > 0 else -(-config.eval.batch_size // n) * n


def _layout(config) -> dict:
  return {"mesh.data": config.mesh.data, "mesh.fsdp": config.mesh.fsdp,
          "train.batch_size": config.train.batch_size,
          "train.grad_accum_steps": config.train.get("grad_accum_steps", 1),
          "model.remat": config.model.get("remat", False),
          "model.attention": config.model.get("attention", "auto"),
          "model.dtype": config.model.get("dtype", "float32")}


def _analyse(lowered_fn, devices: int, hbm_bytes: int, headroom: float) -> dict:
  """Compile `lowered_fn()` (recording its attention layers) and read XLA's analyses."""
  start = time.time()
  with sd_layers.record_attention() as calls:
    lowered = lowered_fn()
  compiled = lowered.compile()
  seconds = time.time() - start
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
          + m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # Work inside Pallas kernels is invisible to XLA's count: add the attention matmuls they do.
  kernel_flops = sum(_attention_flops(c) for c in calls if c["kernel"] == "splash") // devices
  kinds = sorted({(c["q_len"], c["kv_len"], c["heads"], c["dim_head"], c["kernel"])
                  for c in calls})
  return {
      "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
      "code_bytes": int(m.generated_code_size_in_bytes), "peak_bytes": int(peak),
      "fits": bool(peak <= (1.0 - headroom) * hbm_bytes),
      "flops": float(cost.get("flops", 0.0)) + kernel_flops,
      "attention": [dict(zip(("q_len", "kv_len", "heads", "dim_head", "kernel"), k))
                    for k in kinds],
      "compile_seconds": round(seconds, 1),
  }


def _attention_flops(call: dict) -> int:
  """Forward matmul FLOPs of one attention call (q k^T and p v) over its whole batch."""
  return 4 * call["batch"] * call["heads"] * call["q_len"] * call["kv_len"] * call["dim_head"]


def plan(config: ml_collections.ConfigDict, topology: Topology, programs=PROGRAMS,
         infer_batch: int = 0, headroom: float = 0.1) -> dict:
  """Compile `programs` for `topology` and return the report (the --json document)."""
  unknown = set(programs) - set(PROGRAMS)
  if unknown:
    raise ValueError(f"--programs: unknown {sorted(unknown)}; expected some of {PROGRAMS}")
  mesh = parallel.make_mesh(config, topology.devices)
  n = mesh.devices.size
  model = SemFlow.from_config(config, mesh)
  report = {"topology": topology.name, "platform": topology.platform, "chips": n,
            "hbm_bytes": topology.hbm_bytes, "headroom": headroom,
            "mesh": {k: int(v) for k, v in mesh.shape.items()}, "layout": _layout(config),
            "programs": {}}
  analyse = lambda fn: _analyse(fn, n, topology.hbm_bytes, headroom)
  if "train_step" in programs:
    tx = state_lib.make_optimizer(config)
    micro = config.train.get("grad_accum_steps", 1)
    parallel.batch_size_per_process(config.train.batch_size, mesh, micro)  # divisibility
    abstract_state = state_lib.abstract(model, tx, config, mesh)
    logging.info("compiling train_step for %s (%d devices)", topology.name, n)
    result = analyse(lambda: train.lower_train_step(model, tx, config, mesh, abstract_state,
                                                    train_batch_spec(model, config)))
    result["state_bytes"] = parallel.bytes_per_device(
        abstract_state, jax.tree.map(lambda x: x.sharding, abstract_state))
    result["batch_per_chip"] = config.train.batch_size / n / micro
    report["programs"]["train_step"] = result

  inference = [p for p in programs if p != "train_step"]
  if inference:
    params = state_lib.abstract_params(model, config, mesh)
    params_bytes = parallel.bytes_per_device(params, jax.tree.map(lambda x: x.sharding, params))
    b = inference_batch(config, mesh, infer_batch)
    sharding = (parallel.batch_sharding(mesh) if b % n == 0 else parallel.replicated(mesh))
    h, w = model.image_size
    images = jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=sharding)
    labels = jax.ShapeDtypeStruct((b, h, w, 1), jnp.uint8, sharding=sharding)
    # Evaluation keys the perturbation noise per example (evaluate._example_keys).
    rng = jax.ShapeDtypeStruct((b, 2), jnp.uint32, sharding=sharding)
    e = config.eval
    compiled = programs_lib.Programs(model)
    lowerings = {  # the evaluator's main samplers (evaluate.Evaluator)
        "segment": lambda: compiled.segment(max(e.seg_steps), e.seg_methods[0]).lower(params,
                                                                                      images),
        "synthesize": lambda: compiled.synthesize(e.synth_steps, e.synth_method).lower(
            params, labels, rng),
    }
    for name in inference:
      logging.info("compiling %s for %s (%d devices, batch %d)", name, topology.name, n, b)
      result = analyse(lowerings[name])
      result["state_bytes"] = params_bytes
      result["batch_per_chip"] = b / n if b % n == 0 else b
      report["programs"][name] = result
  return report


def format_report(report: dict) -> str:
  gib = lambda b: f"{b / GIB:.3f}"
  lines = [f"{report['topology']}: {report['chips']} {report['platform']} devices, "
           f"{gib(report['hbm_bytes'])} GiB each ({report['headroom']:.0%} kept free); "
           f"mesh {report['mesh']}; " + ", ".join(f"{k}={v}" for k, v in report["layout"].items()),
           "",
           "| program | batch/chip | state GiB | args GiB | temp GiB | peak GiB | HBM GiB | fits | "
           "TFLOP/chip | compile s |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for name, r in report["programs"].items():
    lines.append(f"| {name} | {r['batch_per_chip']:g} | {gib(r['state_bytes'])} | "
                 f"{gib(r['argument_bytes'])} | {gib(r['temp_bytes'])} | {gib(r['peak_bytes'])} | "
                 f"{gib(report['hbm_bytes'])} | {'yes' if r['fits'] else 'NO'} | "
                 f"{r['flops'] / 1e12:.3g} | {r['compile_seconds']:.0f} |")
  for name, r in report["programs"].items():
    if r["attention"]:
      kernels = "; ".join(f"{a['q_len']}x{a['kv_len']} tokens, {a['heads']}x{a['dim_head']}: "
                          f"{a['kernel']}" for a in r["attention"])
      lines.append(f"\n{name} attention (queries x keys, heads x dim): {kernels}")
  return "\n".join(lines)


_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, optionally with :arg.",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "v5e-16, v4-32, v5p-8, v6e-8, ... or cpu-N.")
_PROGRAMS = flags.DEFINE_list("programs", list(PROGRAMS), "Which programs to compile.")
_INFER_BATCH = flags.DEFINE_integer("infer_batch", 0, "Global batch of segment/synthesize "
                                    "(0: eval.batch_size rounded up to the chips; 1: one file).")
_HEADROOM = flags.DEFINE_float("headroom", 0.1, "Fraction of HBM kept free for the runtime.")
_HBM_GIB = flags.DEFINE_float("hbm_gib", 0.0, "Override the memory per device (GiB).")
_JSON = flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    topology = get_topology(_TOPOLOGY.value, _HBM_GIB.value)
    report = plan(_CONFIG.value, topology, tuple(_PROGRAMS.value), _INFER_BATCH.value,
                  _HEADROOM.value)
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_report(report))
  if _JSON.value:
    from semflow_jax import storage
    storage.write_json(_JSON.value, report)


if __name__ == "__main__":
  app.run(main)
