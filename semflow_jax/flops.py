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

libtpu's `optimal_seconds` is unusable for most real programs. It counts a loop's body once,
and it answers a negative time, in whole seconds, for programs with instructions it cannot cost:
a Pallas kernel without a cost estimate (jax's splash kernels have none; one SD-1.5 64x64
self-attention layer's forward and backward at two examples: -3.0 s, yet +0.2 ms at one
example), cross-slice transfers (the tiny SD step on two v5e slices: -78 s), the SD-1.5 train
step (-1,010 s). `compiled_cost` reads the compiler's own per-instruction estimates instead
(`estimated_cycles` in the compiled program's backend configs, what `optimal_seconds` is made
of), multiplies loop bodies by their trip counts and counts what has no estimate; `predict`
turns that into seconds: cycles at the chip's clock, plus the Pallas kernels at the MXU's peak
with their head dimension padded to its 128 lanes, plus the collectives' bytes at the chip's
interconnect (ICI) and data-centre network (DCN) bandwidths, not overlapped with compute (the
last three are this module's models, not the compiler's).
"""

import dataclasses
import math
import re

import jax
import jax.extend.core  # jax.extend is a submodule that `import jax` does not bind
import numpy as np

# Dense bf16 peak per chip (TFLOP/s), from Cloud TPU's published specifications. JAX device
# kinds: 'TPU v4', 'TPU v5 lite' (v5e), 'TPU v5' / 'TPU v5p', 'TPU v6 lite' (v6e).
PEAK_BF16_TFLOPS = {"v4": 275.0, "v5e": 197.0, "v5p": 459.0, "v6e": 918.0}
_DEVICE_KINDS = {"tpu v4": "v4", "tpu v5 lite": "v5e", "tpu v5e": "v5e", "tpu v5p": "v5p",
                 "tpu v5": "v5p", "tpu v6 lite": "v6e", "tpu v6e": "v6e"}

# TensorCore clock (GHz): the bf16 peak over one core's MXU FLOPs per cycle (v5e and v6e: one core
# per chip; v4 and v5p: megacore, two cores working on one JAX device). The compiler's
# `estimated_cycles` are in these cycles (checked against its `optimal_seconds` in tests).
CLOCK_GHZ = {"v4": 1.05, "v5e": 1.5, "v5p": 1.75, "v6e": 1.75}
# Data-centre network bandwidth per chip between slices (GB/s): a v5e host's 8 chips share its
# 2 x 100 Gb/s NICs (Cloud TPU's v5e page). Others unknown here: no cross-slice estimate.
DCN_GBYTES_PER_CHIP = {"v5e": 2 * 100 / 8 / 8}
# Inter-chip interconnect bandwidth into one chip (GB/s): half its bidirectional figure (v5e
# 400 GB/s, v4 300 GB/s (6 x 50 GB/s links), v5p 1,200 GB/s, v6e 800 GB/s; Cloud TPU's pages).
ICI_GBYTES_PER_CHIP = {"v4": 150.0, "v5e": 200.0, "v5p": 600.0, "v6e": 400.0}
MXU_LANES = 128

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
  kernels: float = 0.0   # the Pallas kernels' part of `total`
  kernels_mxu: float = 0.0  # the same as the MXU runs them: head dimension padded to 128 lanes

  def __iadd__(self, other):
    self.total += other.total
    self.as_xla += other.as_xla
    self.kernels += other.kernels
    self.kernels_mxu += other.kernels_mxu
    return self

  def scaled(self, total: float, as_xla: float) -> "Counts":
    return Counts(self.total * total, self.as_xla * as_xla, self.kernels * total,
                  self.kernels_mxu * total)


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


def _kernel_flops(eqn) -> tuple[float, float]:
  """(FLOPs, FLOPs as the MXU runs them) of one Pallas kernel call."""
  name = str(eqn.params.get("name", ""))
  if name.startswith("splash"):
    # q and k: the first two floating-point operands (the mask's block tables are integers).
    q, k = [v.aval.shape for v in eqn.invars
            if len(v.aval.shape) >= 3 and jax.numpy.issubdtype(v.aval.dtype, np.floating)][:2]
    units = next(u for key, u in _SPLASH_UNITS if key in name)
    flops = units * math.prod(q[:-2]) * q[-2] * k[-2] * q[-1]
    # Every product in the kernel has the head dimension on the MXU's lanes (as the contracted
    # dimension of q k^T, the output one of p v): a dimension of 40 fills 40 of 128.
    return flops, flops * -(-q[-1] // MXU_LANES) * MXU_LANES / q[-1]
  estimate = eqn.params.get("cost_estimate")
  flops = float(getattr(estimate, "flops", 0) or 0)
  return flops, flops


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
      flops, mxu = _kernel_flops(eqn)
      result += Counts(flops, 0.0, flops, mxu)
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
  """The compiled program's FLOPs per device per call.

  `cost`: the compiled program's cost_analysis() (per device); `counts`: `count` of the traced
  program; `devices`: those the program is partitioned over. Returns {'flops', 'xla_flops',
  'optimal_seconds'} ('optimal_seconds': the compiler's raw estimate, None where it gives none,
  e.g. XLA:CPU; see `predicted_seconds` for what it means).
  """
  xla_flops = float(cost.get("flops", 0.0))
  optimal = cost.get("optimal_seconds")
  return {"flops": xla_flops + max(counts.total - counts.as_xla, 0.0) / devices,
          "xla_flops": xla_flops, "optimal_seconds": None if optimal is None else float(optimal)}


def predicted_seconds(compiled, counts: Counts, devices: int, device) -> dict:
  """The predicted seconds per call of a compiled program on `device`'s chip, and where the
  figure comes from: {'predicted_seconds', 'estimate', 'compiler_seconds', 'kernel_seconds',
  'ici_seconds', 'dcn_seconds', 'loops', 'uncosted_kernels', 'seconds_by_kind'}.

  'estimate' is 'compiler' where libtpu's `optimal_seconds` is positive and the program has no
  loop, no uncosted kernel and no cross-slice collective (then it is the sum of the same
  per-instruction estimates); otherwise 'compiled costs': `compiled_cost` through `predict`.
  None where the chip is not a known TPU.
  """
  optimal = cost_analysis(compiled).get("optimal_seconds")
  none = {"predicted_seconds": None, "estimate": None, "compiler_seconds": None,
          "kernel_seconds": None, "ici_seconds": None, "dcn_seconds": None, "loops": None,
          "uncosted_kernels": None, "seconds_by_kind": None}
  if chip_kind(device) not in CLOCK_GHZ:
    return none
  cost = compiled_cost(compiled.as_text())
  parts = predict(cost, counts, devices, device)
  clock = CLOCK_GHZ[chip_kind(device)] * 1e9
  result = {"compiler_seconds": parts["compiler"], "kernel_seconds": parts["kernels"],
            "ici_seconds": parts["ici"], "dcn_seconds": parts["dcn"], "loops": cost.loops,
            "uncosted_kernels": cost.kernels,
            # Where the compiled costs' compute time goes (the MFU's breakdown).
            "seconds_by_kind": {k: v / clock for k, v in sorted(cost.cycles_by_kind.items())}}
  if (optimal is not None and float(optimal) > 0 and not cost.loops and not cost.kernels
      and not cost.dcn_bytes):
    return {**result, "predicted_seconds": float(optimal), "estimate": "compiler"}
  return {**result, "predicted_seconds": parts["seconds"], "estimate": "compiled costs"}


def cost_analysis(compiled) -> dict:
  """compiled.cost_analysis() as one dict (older JAX returned a list of one)."""
  cost = compiled.cost_analysis() or {}
  return cost[0] if isinstance(cost, (list, tuple)) else dict(cost)


def mfu(flops_per_device: float, seconds: float, device) -> float:
  """Model FLOP utilisation: achieved FLOP/s per chip over its bf16 peak (nan where unknown)."""
  peak = peak_flops(device)
  return flops_per_device / seconds / peak if peak and seconds > 0 else float(np.nan)


@dataclasses.dataclass
class CompiledCost:
  """What the compiler estimates of one call of a compiled TPU program, per device."""
  cycles: float = 0.0           # its per-instruction estimated_cycles, loop bodies x trip counts
  loops: int = 0                # while loops (each counted with its trip count)
  uncounted_loops: int = 0      # while loops whose trip count is not in the program (counted once)
  kernels: int = 0              # Pallas kernel calls without the compiler's estimate
  ici_bytes: float = 0.0        # bytes out of collectives inside a slice (no cycle estimate)
  dcn_bytes: float = 0.0        # bytes sent between slices (no estimate either)
  uncosted: dict = dataclasses.field(default_factory=dict)  # other opcodes without an estimate
  # `cycles` by what the instruction computes: 'mxu' (fusions with a convolution or a dot: the
  # TPU compiler writes matmuls as convolutions), 'other' (elementwise, normalisation,
  # reductions, copies).
  cycles_by_kind: dict = dataclasses.field(default_factory=dict)


_COMPUTATION = re.compile(r"^(ENTRY )?%?([\w.\-]+) \(.*\{\s*$")
_OPCODE = re.compile(r"= (?:\([^=]*\)|\S+) ([a-z][\w\-]*)\(")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_LT_CONSTANT = re.compile(r"constant\((\d+)\)")
_SHAPE = re.compile(r"(bf16|f16|f32|s32|u32|s8|u8|pred|f64|s64|u64)\[([\d,]*)\]")
_BYTES = {"bf16": 2, "f16": 2, "f32": 4, "s32": 4, "u32": 4, "s8": 1, "u8": 1, "pred": 1,
          "f64": 8, "s64": 8, "u64": 8}
# Opcodes that cost nothing at run time (no kernel is emitted for them).
_FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
         "partition-id", "replica-id", "opt-barrier", "add-dependency", "iota"}
_COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")


def _computations(hlo_text: str) -> tuple[dict, str]:
  """{name: [instruction lines]} of an HLO module's text, and the entry computation's name."""
  computations, current, entry = {}, None, ""
  for line in hlo_text.splitlines():
    if current is None:
      match = _COMPUTATION.match(line)
      if match:
        current = match.group(2)
        computations[current] = []
        entry = current if match.group(1) else entry
    elif line.strip() == "}":
      current = None
    else:
      computations[current].append(line)
  return computations, entry


def _trip_count(line: str, computations: dict):
  """A while loop's trip count: the compiler's known_trip_count, else the bound of a
  `counter < constant` condition (scan and fori_loop count from 0 in steps of 1), else None."""
  known = _TRIP.search(line)
  if known:
    return int(known.group(1))
  condition = re.search(r"condition=%?([\w.\-]+)", line).group(1)
  lines = computations.get(condition, [])
  root = next((l for l in lines if "ROOT" in l and " compare(" in l and "direction=LT" in l), None)
  if root is None:
    return None
  for l in lines:
    name = l.split("=")[0].strip().lstrip("%")
    if " constant(" in l and re.search(rf"%{re.escape(name)}\b", root):
      return int(_LT_CONSTANT.search(l).group(1))
  return None


def _shape_bytes(line: str, first: bool = False, index=None) -> int:
  """Bytes of an instruction's result: all of it, its tuple's first element, or element `index`."""
  rhs = line.split(" = ", 1)[1]
  result = rhs[:rhs.index(")") + 1] if rhs.startswith("(") else rhs.split(" ", 1)[0]
  shapes = _SHAPE.findall(result)
  if index is not None:
    shapes = shapes[index:index + 1]
  elif first:
    shapes = shapes[:1]
  return sum(_BYTES[t] * math.prod(int(d) for d in dims.split(",") if d) for t, dims in shapes)


def compiled_cost(hlo_text: str, classify=None) -> CompiledCost:
  """The compiler's per-instruction cycle estimates of a compiled TPU program
  (`compiled.as_text()`), summed with every loop iteration and the most expensive branch of a
  conditional, and what it left without an estimate.

  `classify(line, kind)` -> key of `cycles_by_kind` for an instruction's HLO line and its kind
  ('mxu' / 'other'); default: the kind (benchmarks/compile_step.py splits by model part).
  """
  computations, entry = _computations(hlo_text)
  result = CompiledCost()

  def kind_of(line: str, opcode: str) -> str:
    called = re.search(r"calls=%?([\w.\-]+)", line)
    body = "\n".join(computations.get(called.group(1), [])) if called else line
    mxu = opcode in ("convolution", "dot") or " convolution(" in body or " dot(" in body
    return "mxu" if mxu else "other"

  def walk(name: str) -> dict:
    """{kind: cycles} of one call of computation `name`."""
    cycles: dict = {}
    add = lambda parts, times=1: [cycles.__setitem__(k, cycles.get(k, 0.0) + v * times)
                                  for k, v in parts.items()]
    for line in computations.get(name, []):
      line = re.sub(r"/\*.*?\*/", "", line)  # `/*index=5*/` in long tuples
      match = _OPCODE.search(line)
      opcode = match.group(1) if match else ""
      estimate = _CYCLES.search(line)
      if opcode == "while":
        count = _trip_count(line, computations)
        result.loops += 1
        result.uncounted_loops += count is None
        add(walk(re.search(r"body=%?([\w.\-]+)", line).group(1)), count or 1)
      elif opcode == "conditional":
        branches = re.search(r"branch_computations=\{([^}]*)\}", line)
        names = (re.findall(r"%?([\w.\-]+)", branches.group(1)) if branches else
                 re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", line))
        add(max((walk(b) for b in names), key=lambda c: sum(c.values()), default={}))
      elif opcode == "call":
        add(walk(re.search(r"to_apply=%?([\w.\-]+)", line).group(1)))
      elif estimate:
        kind = kind_of(line, opcode)
        add({classify(line, kind) if classify else kind: float(estimate.group(1))})
      elif opcode == "custom-call" and 'custom_call_target="tpu_custom_call"' in line:
        result.kernels += 1
      elif opcode == "send" and "_xla_megascale_transfer_type" in line:
        result.dcn_bytes += _shape_bytes(line, first=True)
      elif opcode.startswith(_COLLECTIVES) and not opcode.endswith("-done"):
        result.ici_bytes += _shape_bytes(line, first=opcode.endswith("-start"))
      elif opcode == "fusion" and "async-collective-start" in line.split("=")[0]:
        result.ici_bytes += _shape_bytes(line, index=1)  # (operand, result, ...) buffers
      elif opcode and opcode not in _FREE and not opcode.endswith("-done") and opcode != "recv":
        result.uncosted[opcode] = result.uncosted.get(opcode, 0) + 1
    return cycles

  result.cycles_by_kind = walk(entry)
  result.cycles = sum(result.cycles_by_kind.values())
  return result


def predict(cost: CompiledCost, counts: Counts, devices: int, device) -> dict:
  """Seconds per call of a compiled program on `device`'s chip, from `compiled_cost` and the
  traced program's `count`: {'seconds', 'compiler', 'kernels', 'ici', 'dcn'} (each part in
  seconds; 'seconds' None where the chip's clock is unknown). The parts are added, not
  overlapped: collectives that the compiler overlaps with compute make the step faster than this.
  """
  kind = chip_kind(device)
  if kind not in CLOCK_GHZ:
    return {"seconds": None, "compiler": None, "kernels": None, "ici": None, "dcn": None}
  compiler = cost.cycles / (CLOCK_GHZ[kind] * 1e9)
  kernels = counts.kernels_mxu / devices / peak_flops(device)
  ici = cost.ici_bytes / (ICI_GBYTES_PER_CHIP[kind] * 1e9)
  dcn = 0.0
  if cost.dcn_bytes:
    bandwidth = DCN_GBYTES_PER_CHIP.get(kind)
    dcn = cost.dcn_bytes / (bandwidth * 1e9) if bandwidth else None
  seconds = None if dcn is None else compiler + kernels + ici + dcn
  return {"seconds": seconds, "compiler": compiler, "kernels": kernels, "ici": ici, "dcn": dcn}
