"""Compile a recipe's train step for a TPU slice and say where its predicted time goes.

  python benchmarks/compile_step.py --config=configs/celebamask_hq.py --topology=v5e-16 \
      --out=/tmp/step [--config.mesh.shard_params=False --config.model.remat=False ...]

The step `--mode=train` compiles (`step.trace_train_step`), compiled by libtpu here as
`semflow_jax.plan` compiles it, then: compile seconds, CPU seconds and peak RSS of this process;
the compiler's memory per chip and `optimal_seconds`; the number of fusions the backend lowered;
the predicted seconds per step from the compiled program's own costs (`flops.compiled_cost`
through `flops.predict`), the MFU they imply; and those costs split by part of the step (the
frozen VAE's encode, the UNet's forward and backward, the update, the rest) and by operation
class (convolution / matmul fusions, normalisation, attention's element-wise work, other),
from the op names XLA keeps in the compiled program. `--out` keeps the compiled HLO text and the
report (OUT.hlo.txt, OUT.json). Run it alone: an SD-1.5 step needs up to ~19 GiB here.
"""

import json
import os
import re
import resource
import sys
import time

from absl import app, flags
from ml_collections import config_flags

# The recipes import `configs` from the repository root (run as `python benchmarks/...`).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from semflow_jax import cli, flops, parallel, plan, runtime, state as state_lib, step as step_lib
from semflow_jax.semflow import SemFlow

_CONFIG = config_flags.DEFINE_config_file("config", None, "Recipe config file.")
_TOPOLOGY = flags.DEFINE_string("topology", "v5e-16", "TPU topology (semflow_jax.plan's names).")
_OUT = flags.DEFINE_string("out", None, "Prefix of the HLO text and JSON report to keep.")

_NORM = re.compile(r"/norm\w*/|GroupNorm|LayerNorm")
_ATTENTION = re.compile(r"/attn\d|attention")


def classify(line: str, kind: str) -> str:
  """'part: class' of one compiled instruction, from its op name."""
  match = re.search(r'op_name="([^"]*)"', line)
  op = match.group(1) if match else ""
  if "AutoencoderKL" in op:
    part = "vae encode"
  elif "transpose(jvp(SDUNet" in op:
    part = "unet backward"
  elif "SDUNet" in op:
    part = "unet forward"
  elif "/cond" in op:
    part = "update"
  else:
    part = "rest"
  if kind == "mxu":
    what = "conv/matmul"
  elif _NORM.search(op):
    what = "normalisation"
  elif _ATTENTION.search(op):
    what = "attention element-wise"
  else:
    what = "other"
  return f"{part}: {what}"


def main(argv):
  del argv
  runtime.configure_process(compile_only=True)
  config = _CONFIG.value
  topology = plan.get_topology(_TOPOLOGY.value)
  device = topology.devices[0]
  mesh = parallel.make_mesh(config, topology.devices)
  model = SemFlow.from_config(config, mesh)
  tx = state_lib.make_optimizer(config)
  abstract_state = state_lib.abstract(model, tx, config, mesh)
  start = time.time()
  traced = step_lib.trace_train_step(model, tx, config, mesh, abstract_state,
                                     step_lib.train_batch_spec(model, config))
  compiled = traced.lower().compile()
  compile_seconds = time.time() - start
  usage = resource.getrusage(resource.RUSAGE_SELF)
  text = compiled.as_text()
  counts = flops.count(traced.jaxpr)
  devices = mesh.devices.size
  cost = flops.compiled_cost(text, classify)
  parts = flops.predict(cost, counts, devices, device)
  clock = flops.CLOCK_GHZ[flops.chip_kind(device)] * 1e9
  seconds = parts["seconds"]
  report = {
      "topology": _TOPOLOGY.value, "compile_seconds": compile_seconds,
      "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss / 2**20,
      "peak_gib_per_chip": plan.peak_bytes(compiled.memory_analysis()) / 2**30,
      "optimal_seconds": flops.cost_analysis(compiled).get("optimal_seconds"),
      "fusions": text.count(" fusion("), "predicted_seconds": seconds, "parts": parts,
      "flops_per_chip": counts.total / devices,
      "mfu": flops.mfu(counts.total / devices, seconds, device) if seconds else None,
      "examples_per_second_per_chip": (config.train.batch_size / devices / seconds
                                       if seconds else None),
      "seconds_by_class": {k: v / clock for k, v in sorted(cost.cycles_by_kind.items(),
                                                           key=lambda kv: -kv[1])}}
  if _OUT.value:
    with open(_OUT.value + ".hlo.txt", "w") as f:
      f.write(text)
    with open(_OUT.value + ".json", "w") as f:
      json.dump(report, f, indent=1)
  json.dump(report, sys.stdout, indent=1)
  print()


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
