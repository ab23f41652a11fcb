"""FLOPs of a compiled program, and what they predict on a TPU chip.

XLA's `cost_analysis()` of a compiled program gives `flops` and, for TPU programs, the
compiler's own run-time estimate `optimal_seconds`. Both count the body of a loop (`scan`,
`fori_loop`: gradient accumulation, the samplers' integration steps) once, whatever its trip
count, and neither sees inside Pallas kernels (splash attention). `count(jaxpr)` counts the
matmul and convolution FLOPs of the traced program both ways, so the difference is exactly what
XLA's figures miss:

  flops per device = XLA's flops + (counted with trip counts and kernels - counted as XLA does)
                     / devices
  predicted seconds = optimal_seconds x flops per device / XLA's flops

(the compiler's throughput on what it sees, extended to what it does not). Splash kernels are
counted as they run: forward 4 BHTSD (q k^T, p v), backward 6 BHTSD (dq kernel: recomputed
logits, dp, dq) + 8 BHTSD (dkv kernel: logits, dp, dv, dk); under remat the forward runs twice,
and the traced program shows it twice. These are the compiler's estimates, not measurements.
"""

import dataclasses
import math

import jax
import jax.extend.core  # jax.extend is a submodule that `import jax` does not bind
import numpy as np

# Dense bf16 peak per chip (TFLOP/s), from Cloud TPU's published specifications. JAX device
# kinds: 'TPU v4', 'TPU v5 lite' (v5e), 'TPU v5' / 'TPU v5p', 'TPU v6 lite' (v6e).
PEAK_BF16_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}
_DEVICE_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5p": "v5p",
                 "tpu v5": "v5p", "tpu v6 lite": "v6e", "tpu v6e": "v6e"}

# Splash attention kernels: FLOPs per (batch x heads x queries x keys x head dim).
_SPLASH_UNITS = (("dkv", 8), ("dq", 6), ("", 4))


def chip_kind(device) -> str:
  """'v5e', 'v4', ... for a TPU device (by its device_kind), '' for anything else."""
  if getattr(device, "platform", "") != "tpu":
    return ""
  return _DEVICE_KINDS.get(str(device.device_kind).lower(), "")


def peak_flops(device) -> float:
  """The device's dense bf16 peak in FLOP/s, or 0 where unknown (CPUs, GPUs, other TPUs)."""
  return PEAK_BF16_TFLOPS.get(chip_kind(device), 0.0) * 1e12


@dataclasses.dataclass
class Counts:
  """Matmul + convolution FLOPs of a whole (global, unpartitioned) traced program."""
  total: float = 0.0     # every loop iteration, kernels included: the program's work
  as_xla: float = 0.0    # loop bodies once, kernels not at all: what XLA's count includes

  def __iadd__(self, other):
    self.total += other.total
    self.as_xla += other.as_xla
    return self

  def scaled(self, total: float, as_xla: float) -> "Counts":
    return Counts(self.total * total, self.as_xla * as_xla)


def _dot_flops(eqn) -> float:
  lhs, _ = (v.aval.shape for v in eqn.invars)
  (contract, _), _ = eqn.params["dimension_numbers"]
  out = eqn.outvars[0].aval.shape
  return 2.0 * math.prod(out) * math.prod(lhs[d] for d in contract)


def _conv_flops(eqn) -> float:
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
  # Each output element is a dot product over the kernel's other dimensions.
  return 2.0 * math.prod(out) * math.prod(rhs) / rhs[out_feature_dim]


def _kernel_flops(eqn) -> float:
  name = str(eqn.params.get("name", ""))
  if name.startswith("splash"):
    # q and k: the first two floating-point operands (the mask's block tables are integers).
    q, k = [v.aval.shape for v in eqn.invars
            if len(v.aval.shape) >= 3 and jax.numpy.issubdtype(v.aval.dtype, np.floating)][:2]
    units = next(u for key, u in _SPLASH_UNITS if key in name)
    return units * math.prod(q[:-2]) * q[-2] * k[-2] * q[-1]
  estimate = eqn.params.get("cost_estimate")
  return float(getattr(estimate, "flops", 0) or 0)


def _subjaxprs(value):
  values = value if isinstance(value, (list, tuple)) else [value]
  for v in values:
    if isinstance(v, jax.extend.core.ClosedJaxpr):
      yield v.jaxpr
    elif isinstance(v, jax.extend.core.Jaxpr):
      yield v


def count(jaxpr) -> Counts:
  """Counts of a (closed) jaxpr, recursing into every sub-program."""
  jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
  result = Counts()
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    if name == "dot_general":
      flops = _dot_flops(eqn)
      result += Counts(flops, flops)
    elif name == "conv_general_dilated":
      flops = _conv_flops(eqn)
      result += Counts(flops, flops)
    elif name == "pallas_call":
      result += Counts(_kernel_flops(eqn), 0.0)
    elif name == "scan":
      result += count(eqn.params["jaxpr"]).scaled(eqn.params["length"], 1.0)
    elif name == "cond":  # the most expensive branch (the update under lax.cond runs or not)
      branches = [count(b) for b in eqn.params["branches"]]
      result += Counts(max(b.total for b in branches), max(b.as_xla for b in branches))
    elif name == "shard_map":  # the body is per device: all devices run it
      devices = math.prod(eqn.params["mesh"].shape.values())
      result += count(eqn.params["jaxpr"]).scaled(devices, devices)
    else:  # pjit, remat, custom_jvp/vjp calls, while (trip count unknown: once)
      for key, value in eqn.params.items():
        if key in ("jvp_jaxpr_fun", "jvp_jaxpr_thunk", "fwd_jaxpr_thunk", "bwd"):
          continue
        for sub in _subjaxprs(value):
          result += count(sub)
  return result


def per_device(cost: dict, counts: Counts, devices: int) -> dict:
  """The compiled program's FLOPs per device per call and the compiler's predicted seconds.

  `cost`: the compiled program's cost_analysis() (per device); `counts`: `count` of the traced
  program; `devices`: those the program is partitioned over. Returns {'flops', 'xla_flops',
  'optimal_seconds', 'predicted_seconds'} ('optimal_seconds' None where the compiler gives
  none, e.g. XLA:CPU, and 'predicted_seconds' None also where its estimate is not positive).
  """
  xla_flops = float(cost.get("flops", 0.0))
  flops = xla_flops + max(counts.total - counts.as_xla, 0.0) / devices
  optimal = cost.get("optimal_seconds")
  predicted = None
  # libtpu answers a negative time for programs it cannot estimate (seen: -78 s): no estimate.
  if optimal is not None and float(optimal) > 0 and xla_flops > 0:
    predicted = float(optimal) * flops / xla_flops
  return {"flops": flops, "xla_flops": xla_flops,
          "optimal_seconds": None if optimal is None else float(optimal),
          "predicted_seconds": predicted}


def cost_analysis(compiled) -> dict:
  """compiled.cost_analysis() as one dict (older JAX returned a list of one)."""
  cost = compiled.cost_analysis() or {}
  return cost[0] if isinstance(cost, (list, tuple)) else dict(cost)


def mfu(flops_per_device: float, seconds: float, device) -> float:
  """Model FLOP utilisation: achieved FLOP/s per chip over its bf16 peak (nan where unknown)."""
  peak = peak_flops(device)
  return flops_per_device / seconds / peak if peak and seconds > 0 else float(np.nan)
