"""Will a run fit the chips, and how fast will it go? Compile its programs for a TPU slice here.

  python -m semflow_jax.plan --config=configs/celebamask_hq.py --topology=v5e-16
  python -m semflow_jax.plan --config=configs/cityscapes.py --topology=v4-32 --json=plan.json
  python -m semflow_jax.plan --config=configs/coco_stuff.py --topology=v5e-16x2 --programs=train_step
  python -m semflow_jax.plan --config=configs/sd15.py:tiny --topology=cpu-8   # no libtpu needed

For TPU topologies (v5e-N and v6e-N: N chips; v4-N and v5p-N: N TensorCores, two per chip; a
suffix xS: S such slices joined over the data-centre network) libtpu's compiler builds the exact
programs a run executes, for devices that need not exist (`jax.experimental.topologies`;
`pip install -r requirements-tpu.lock` or `jax[tpu]`):

- train_step: `step.trace_train_step`, the step `--mode=train` compiles (global batch
  train.batch_size, the config's mesh, FSDP, remat, gradient accumulation, cached image latents
  when data.image_latents is set, state donated);
- segment, synthesize: `programs.Programs`' programs that `--mode=eval` and training-time
  evaluation run (at eval.batch_size rounded up to the chips, or --infer_batch; --infer_batch=1
  is `--mode=segment` on one file), taking the parameters alone.

Each program is compiled in a process of its own (the parent starts one per program and merges
their reports), so a program's compile memory is its own and is freed when it is done.

Per chip it prints the train state (or parameters), XLA's argument / output / temporary bytes,
the peak (arguments + outputs - donated + temporaries + program code), the chip's HBM, whether
the peak fits in HBM less --headroom, and the compiler's estimates (not measurements): FLOPs of
one call per chip (XLA's count plus the loop iterations and Pallas kernels it does not see,
semflow_jax/flops.py), the predicted seconds per call (libtpu's `optimal_seconds` where it is
positive and the program has no loop or kernel it cannot see into, otherwise the compiled
program's per-instruction cycle estimates with every loop iteration, plus the Pallas kernels and
cross-slice collectives it has no estimate for: `flops.predicted_seconds`; the table's
"estimate" column says which), examples/s per chip and MFU against the chip's bf16 peak; then the
compile's own cost here (seconds, CPU seconds, the compiling process's peak RSS) and which
attention kernel every attention layer uses. `--json=FILE` writes the same. `cpu-N` compiles
for N fake CPU devices (XLA:CPU's buffer assignment: an estimate of an accelerator's; no time
estimate), with the host's memory split over them as "HBM". Config overrides work as in semflow_jax.main.
"""

import dataclasses
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from semflow_jax import cli, flops as flops_lib, parallel, programs as programs_lib, runtime
from semflow_jax import state as state_lib, step as step_lib
from semflow_jax.models import sd_layers
from semflow_jax.semflow import SemFlow

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
  """'v5e-16' or 'v5e-16x2' -> keyword arguments of jax.experimental.topologies.get_topology_desc."""
  match = re.fullmatch(r"(v5litepod|v5e|v6e|v4|v5p)-(\d+)(?:x(\d+))?", name)
  if not match:
    raise ValueError(f"--topology={name!r}: expected v5e-N, v6e-N (N chips), v4-N, v5p-N "
                     "(N TensorCores), each optionally xS for S slices (v5e-16x2), or cpu-N")
  kind, n = _ALIASES.get(match.group(1), match.group(1)), int(match.group(2))
  slices = int(match.group(3) or 1)
  if slices < 1:
    raise ValueError(f"--topology={name!r}: at least one slice")
  if kind in ("v5e", "v6e"):
    if n not in _GRID_2D:
      raise ValueError(f"--topology={name!r}: {kind} slices have {sorted(_GRID_2D)} chips")
    bounds = (1, 1, 1) if n == 1 else (2, 4, 1) if n == 8 else (2, 2, 1)
    return dict(topology_name=f"{kind}:{_GRID_2D[n]}", chip_config_name="default",
                chips_per_host_bounds=bounds, num_slices=slices, wrap=(False, False, False))
  if n % 2 or n // 2 not in _GRID_3D:
    raise ValueError(f"--topology={name!r}: {kind}-N counts TensorCores (2 per chip); N in "
                     f"{sorted(2 * c for c in _GRID_3D)}")
  return dict(topology_name=f"{kind}:{_GRID_3D[n // 2]}", chip_config_name="megacore",
              chips_per_host_bounds=(2, 2, 1), num_slices=slices, wrap=(False, False, False))


def get_topology(name: str, hbm_gib: float = 0.0) -> Topology:
  """Devices to compile for: a TPU slice's (from libtpu, no TPU needed) or fake CPU devices."""
  cpu = re.fullmatch(r"cpu-(\d+)", name)
  if cpu:
    n = int(cpu.group(1))
    devices = jax.devices("cpu")
    if len(devices) < n:
      raise ValueError(f"--topology={name}: only {len(devices)} CPU devices (set "
                       f"jax_num_cpu_devices={n} before JAX starts; semflow_jax.plan's main does)")
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


def peak_bytes(memory) -> int:
  """Peak bytes per device of a compiled program (its memory_analysis()): arguments + outputs -
  donated (aliased) + temporaries + program code."""
  return int(memory.argument_size_in_bytes + memory.output_size_in_bytes
             - memory.alias_size_in_bytes + memory.temp_size_in_bytes
             + memory.generated_code_size_in_bytes)


def fits(peak: int, hbm_bytes: int, headroom: float) -> bool:
  """Does `peak` fit in the HBM less the fraction `headroom` kept free for the runtime?"""
  return peak <= (1.0 - headroom) * hbm_bytes


def _layout(config) -> dict:
  return {"mesh.dcn_data": config.mesh.get("dcn_data", -1), "mesh.data": config.mesh.data,
          "mesh.fsdp": config.mesh.fsdp,
          "mesh.shard_params": parallel.shards_params(config), "train.batch_size": config.train.batch_size,
          "train.grad_accum_steps": config.train.get("grad_accum_steps", 1),
          "model.remat": config.model.get("remat", False),
          "model.remat_policy": config.model.get("remat_policy", "full"),
          "model.attention": config.model.get("attention", "auto"),
          "model.dtype": config.model.get("dtype", "float32"),
          "data.image_latents": bool(config.data.get("image_latents"))}


def _process_cost() -> dict:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return {"peak_rss_bytes": int(usage.ru_maxrss) * 1024,  # Linux: kilobytes
          "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1)}


def _analyse(trace_fn, devices: list, hbm_bytes: int, headroom: float, examples: float) -> dict:
  """Trace, lower and compile `trace_fn()` (recording its attention layers); XLA's analyses.
  `examples`: per chip per call, for examples/s."""
  start = time.time()
  with sd_layers.record_attention() as calls:
    traced = trace_fn()
  counts = flops_lib.count(traced.jaxpr)
  compiled = traced.lower().compile()
  seconds = time.time() - start
  m = compiled.memory_analysis()
  peak = peak_bytes(m)
  cost = flops_lib.per_device(flops_lib.cost_analysis(compiled), counts, len(devices))
  timing = flops_lib.predicted_seconds(compiled, counts, len(devices), devices[0])
  predicted = timing["predicted_seconds"]
  peak_flops = flops_lib.peak_flops(devices[0])
  kinds = sorted({(c["q_len"], c["kv_len"], c["heads"], c["dim_head"], c["kernel"])
                  for c in calls})
  return {
      "argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
      "code_bytes": int(m.generated_code_size_in_bytes), "peak_bytes": peak,
      "fits": fits(peak, hbm_bytes, headroom),
      # The compiler's estimates (flops.py), not measurements:
      **cost, **timing,
      "examples_per_second_per_chip": examples / predicted if predicted else None,
      "mfu": cost["flops"] / predicted / peak_flops if predicted and peak_flops else None,
      "attention": [dict(zip(("q_len", "kv_len", "heads", "dim_head", "kernel"), k))
                    for k in kinds],
      "compile_seconds": round(seconds, 1),
  }


def plan(config: ml_collections.ConfigDict, topology: Topology, programs=PROGRAMS,
         infer_batch: int = 0, headroom: float = 0.1) -> dict:
  """Compile `programs` for `topology` in this process and return the report (the --json
  document). `main` calls it once per program, each in a process of its own."""
  unknown = set(programs) - set(PROGRAMS)
  if unknown:
    raise ValueError(f"--programs: unknown {sorted(unknown)}; expected some of {PROGRAMS}")
  mesh = parallel.make_mesh(config, topology.devices)
  n = mesh.devices.size
  model = SemFlow.from_config(config, mesh)
  tx = state_lib.make_optimizer(config)
  abstract_state = state_lib.abstract(model, tx, config, mesh)
  report = {"topology": topology.name, "platform": topology.platform, "chips": n,
            "slices": parallel.num_slices(topology.devices),
            "chip": flops_lib.chip_kind(topology.devices[0]) or topology.platform,
            "peak_tflops_per_chip": flops_lib.peak_flops(topology.devices[0]) / 1e12 or None,
            "hbm_bytes": topology.hbm_bytes, "headroom": headroom,
            "mesh": {k: int(v) for k, v in mesh.shape.items()}, "layout": _layout(config),
            "programs": {}}
  analyse = lambda fn, examples: _analyse(fn, topology.devices, topology.hbm_bytes, headroom,
                                          examples)
  if "train_step" in programs:
    micro = config.train.get("grad_accum_steps", 1)
    parallel.batch_size_per_process(config.train.batch_size, mesh, micro)  # divisibility
    logging.info("compiling train_step for %s (%d devices)", topology.name, n)
    spec = step_lib.train_batch_spec(model, config)
    result = analyse(lambda: step_lib.trace_train_step(model, tx, config, mesh, abstract_state,
                                                       spec), config.train.batch_size / n)
    result["state_bytes"] = parallel.bytes_per_device(abstract_state)
    result["batch_per_chip"] = config.train.batch_size / n / micro
    report["programs"]["train_step"] = result

  inference = [p for p in programs if p != "train_step"]
  if inference:
    params = abstract_state.model_params()
    b = infer_batch if infer_batch > 0 else parallel.round_up_to_devices(config.eval.batch_size,
                                                                          mesh)
    sharding = (parallel.batch_sharding(mesh) if b % n == 0 else parallel.replicated(mesh))
    h, w = model.image_size
    images = jax.ShapeDtypeStruct((b, h, w, 3), jnp.uint8, sharding=sharding)
    labels = jax.ShapeDtypeStruct((b, h, w, 1), jnp.uint8, sharding=sharding)
    # Evaluation keys the perturbation noise per example (evaluate._example_keys).
    rng = jax.ShapeDtypeStruct((b, 2), jnp.uint32, sharding=sharding)
    e = config.eval
    compiled = programs_lib.Programs(model)
    traces = {  # the evaluator's main samplers (evaluate.Evaluator)
        "segment": lambda: _trace(compiled.segment(max(e.seg_steps), e.seg_methods[0]), params,
                                  images),
        "synthesize": lambda: _trace(compiled.synthesize(e.synth_steps, e.synth_method), params,
                                     labels, rng),
    }
    for name in inference:
      logging.info("compiling %s for %s (%d devices, batch %d)", name, topology.name, n, b)
      result = analyse(traces[name], b / n)
      result["state_bytes"] = parallel.bytes_per_device(params)
      result["batch_per_chip"] = b / n if b % n == 0 else b
      report["programs"][name] = result
  return report


def _trace(program, *args) -> jax.stages.Traced:
  """A Programs program traced for `args` (its jitted function's, whichever wrapper holds it)."""
  return getattr(program, "jitted", program).trace(*args)


def _fmt(value, spec: str, missing: str = "-") -> str:
  return missing if value is None else format(value, spec)


def format_report(report: dict) -> str:
  gib = lambda b: f"{b / GIB:.3f}"
  peak = report.get("peak_tflops_per_chip")
  lines = [f"{report['topology']}: {report['chips']} {report['platform']} devices"
           f"{' in %d slices' % report['slices'] if report.get('slices', 1) > 1 else ''}, "
           f"{gib(report['hbm_bytes'])} GiB each ({report['headroom']:.0%} kept free)"
           f"{f', {peak:g} TFLOP/s bf16 peak' if peak else ''}; mesh {report['mesh']}; "
           + ", ".join(f"{k}={v}" for k, v in report["layout"].items()),
           "",
           "TFLOP/chip, s/call, examples/s/chip and MFU are estimates from the compiled program, "
           "not measurements (estimate: 'compiler' = libtpu's optimal_seconds; 'compiled costs' "
           "= its per-instruction cycles x loop trips + kernels at the MXU's peak; flops.py).",
           "",
           "| program | batch/chip | state GiB | args GiB | temp GiB | peak GiB | HBM GiB | fits | "
           "TFLOP/chip | s/call | estimate | examples/s/chip | MFU | compile s | CPU min | "
           "peak RSS GiB |",
           "| --- " * 16 + "|"]
  for name, r in report["programs"].items():
    rss = r.get("peak_rss_bytes")
    cpu = r.get("cpu_seconds")
    lines.append(
        f"| {name} | {r['batch_per_chip']:g} | {gib(r['state_bytes'])} | "
        f"{gib(r['argument_bytes'])} | {gib(r['temp_bytes'])} | {gib(r['peak_bytes'])} | "
        f"{gib(report['hbm_bytes'])} | {'yes' if r['fits'] else 'NO'} | "
        f"{r['flops'] / 1e12:.3g} | {_fmt(r['predicted_seconds'], '.3g')} | "
        f"{r.get('estimate') or '-'} | "
        f"{_fmt(r['examples_per_second_per_chip'], '.3g')} | {_fmt(r['mfu'], '.1%')} | "
        f"{r['compile_seconds']:.0f} | {_fmt(None if cpu is None else cpu / 60, '.1f')} | "
        f"{_fmt(None if rss is None else rss / GIB, '.1f')} |")
  for name, r in report["programs"].items():
    if r.get("estimate") == "compiled costs":
      dcn = r["dcn_seconds"]
      kinds = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in r["seconds_by_kind"].items())
      lines.append(f"\n{name} predicted time (compiled costs, ms per call): compute "
                   f"{r['compiler_seconds'] * 1e3:.4g} ({kinds}), Pallas kernels "
                   f"{r['kernel_seconds'] * 1e3:.4g}, ICI collectives {r['ici_seconds'] * 1e3:.4g}"
                   f", DCN {_fmt(dcn and dcn * 1e3, '.4g', 'unknown')}; libtpu's estimate "
                   f"{r['optimal_seconds']:.4g} s; {r['loops']} loops, "
                   f"{r['uncosted_kernels']} kernels without its estimate")
  for name, r in report["programs"].items():
    if r["attention"]:
      kernels = "; ".join(f"{a['q_len']}x{a['kv_len']} tokens, {a['heads']}x{a['dim_head']}: "
                          f"{a['kernel']}" for a in r["attention"])
      lines.append(f"\n{name} attention (queries x keys, heads x dim): {kernels}")
  return "\n".join(lines)


def _define_flags():
  """Defined only when run as a program (tests and benchmarks import plan's functions, and
  importing it beside semflow_jax.main must not define --config twice)."""
  config_flags.DEFINE_config_file("config", None, "Config file, optionally with :arg.",
                                  lock_config=True)
  flags.DEFINE_string("topology", None,
                      "v5e-16, v4-32, v5p-8, v6e-8, v5e-16x2 (two slices), ... or cpu-N.")
  flags.DEFINE_list("programs", list(PROGRAMS), "Which programs to compile.")
  flags.DEFINE_integer("infer_batch", 0, "Global batch of segment/synthesize "
                       "(0: eval.batch_size rounded up to the chips; 1: one file).")
  flags.DEFINE_float("headroom", 0.1, "Fraction of HBM kept free for the runtime.")
  flags.DEFINE_float("hbm_gib", 0.0, "Override the memory per device (GiB).")
  flags.DEFINE_string("json", None, "Also write the report as JSON to this file.")
  flags.mark_flags_as_required(["config", "topology"])


def _one_per_process(programs) -> dict:
  """Run this command once per program, each in a child process; merge their reports."""
  merged = None
  for name in programs:
    with tempfile.TemporaryDirectory() as tmp:
      out = os.path.join(tmp, "plan.json")
      argv = [a for a in sys.argv[1:] if not a.startswith(("--programs=", "--json="))]
      command = [sys.executable, "-m", "semflow_jax.plan", *argv, f"--programs={name}",
                 f"--json={out}"]
      logging.info("compiling %s in a process of its own", name)
      run = subprocess.run(command, stdout=subprocess.DEVNULL)
      if run.returncode or not os.path.exists(out):
        raise RuntimeError(f"compiling {name} failed (exit status {run.returncode}); the "
                           f"command: {' '.join(command)}")
      with open(out) as f:
        report = json.load(f)
    if merged is None:
      merged = report
    else:
      merged["programs"].update(report["programs"])
  return merged


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  # Before JAX starts a backend: CPU only (the planner compiles, never runs; compile-only TPU
  # devices come from libtpu on demand), enough CPU devices for cpu-N.
  cpu = re.fullmatch(r"cpu-(\d+)", f.topology)
  runtime.configure_process(compile_only=True, cpu_devices=int(cpu.group(1)) if cpu else None)
  programs = tuple(f.programs)
  try:
    unknown = set(programs) - set(PROGRAMS)
    if unknown:
      raise ValueError(f"--programs: unknown {sorted(unknown)}; expected some of {PROGRAMS}")
    if not re.fullmatch(r"cpu-(\d+)", f.topology):
      tpu_slice(f.topology)  # a bad name is one line here, not one per child
    if len(programs) > 1:
      report = _one_per_process(programs)
    else:
      topology = get_topology(f.topology, f.hbm_gib)
      report = plan(f.config, topology, programs, f.infer_batch, f.headroom)
      for result in report["programs"].values():
        result.update(_process_cost())
  except (ValueError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(format_report(report))
  if f.json:
    from semflow_jax import storage
    storage.write_json(f.json, report)


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
