"""The protocol every metric evaluator follows, and the reductions over processes they use.

A metric is a module `semflow_jax/evaluators/<name>.py` with a class `Metric(common.Metric)`;
`config.eval.metrics` lists the names that run, and `load(name)` imports the module by name, so
adding a metric is one new file plus its name in a config. The protocol (semflow_jax/evaluate.py)
makes one pass over the validation split for all metrics together; per batch:

  shared = segmentations and syntheses of the batch     (started on the devices, asynchronously)
  own = metric.device(params, batch, shared)            (a metric's extra device programs)
  ... while the devices work on the next batch:
  metric.update(HostBatch(data, shared), own)           (this process's examples, on the host)

and at the end `metric.result(workdir)` sums what this process accumulated over processes
(`sum_over_processes`, `combine_disjoint`: collective, every process calls them in the same
order) and returns the metric's numbers. Programs come from the run's `Programs` or are
`programs.Program`s the metric builds once, so `device` called with ShapeDtypeStructs compiles
instead of running (`Evaluator.compile`). Synthesis perturbation noise is keyed by each
example's index in the split, so every metric is the same on any number of processes.
"""

import dataclasses
import functools
import importlib
import pkgutil
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from semflow_jax import flow, metrics, parallel
from semflow_jax.programs import Programs
from semflow_jax.semflow import SemFlow

Sampler = Tuple[str, int]  # (method, steps)
# What a metric `uses` of the shared work: segmentations of the real images, syntheses from the
# true masks, and each label also at its stored size (`pipeline.NATIVE_LABEL_KEY`).
SEGMENTATION, SYNTHESIS, NATIVE_LABELS = "segmentation", "synthesis", "native_labels"


class Stopped(Exception):
  """`should_stop()` said yes: the evaluation ends without a result."""


@dataclasses.dataclass
class Run:
  """What every metric of a run may read; fixed for the run."""
  config: ml_collections.ConfigDict
  model: SemFlow
  programs: Programs
  builder: object                # the dataset's tfds builder
  mesh: Mesh
  seg_samplers: List[Sampler]    # segmentation mIoU per sampler
  synth_samplers: List[Sampler]  # the first names the synthesis metrics plainly, the others
                                 # get a `_<method>_<steps>` suffix
  num_examples: int              # validation examples scored
  batch_size: int                # the global evaluation batch (a multiple of the devices)
  class_names: List[str]
  has_alt: bool                  # the dataset has a second rendering of each mask (image_alt)
  preprocess: object             # pipeline.Preprocess of the model's input
  should_stop: Callable[[], bool] = lambda: False  # set by each evaluation

  @property
  def main_seg_sampler(self) -> Sampler:
    """The first method's most-step sampler: its predictions are shown in the sample grid and
    its per-class IoU goes to TensorBoard."""
    method = self.seg_samplers[0][0]
    return max((s for s in self.seg_samplers if s[0] == method), key=lambda s: s[1])

  @property
  def suffixes(self) -> List[str]:
    """The synthesis samplers' name suffixes, in order ('' first)."""
    return [self.suffix(s) for s in self.synth_samplers]

  def suffix(self, sampler: Sampler) -> str:
    """'' for the first synthesis sampler, '_<method>_<steps>' for the others."""
    return "" if sampler == self.synth_samplers[0] else f"_{sampler[0]}_{sampler[1]}"

  def check_stop(self) -> None:
    """Raise Stopped when the caller asked to stop (for metrics with loops of their own)."""
    if self.should_stop():
      raise Stopped()


def segmentation_key(sampler: Sampler) -> str:
  """The shared output of segmentation with `sampler`: int32 labels (B, H, W)."""
  return f"segmentation_{sampler[0]}_{sampler[1]}"


def synthesis_key(what: str, suffix: str) -> str:
  """The shared outputs of the synthesis sampler named by `suffix`: 'a', 'b' (float [-1, 1]),
  'a_uint8', 'b_uint8' (quantised as a saved image), both (B, H, W, 3), the two syntheses of
  each mask from different perturbation noise."""
  return f"synthesis_{what}{suffix}"


class Rows(Mapping):
  """This process's rows of batch-sharded device outputs, each fetched once, on first use."""

  def __init__(self, arrays: Mapping):
    self._arrays, self._host = arrays, {}

  def __getitem__(self, key):
    if key not in self._host:
      self._host[key] = parallel.local_rows(self._arrays[key])
    return self._host[key]

  def __iter__(self):
    return iter(self._arrays)

  def __len__(self):
    return len(self._arrays)


class HostBatch:
  """One batch on the host, as metrics score it: this process's examples.

  `data`: the pipeline's numpy batch (image, label at the model's size, image_alt where the
  dataset has it, native-size labels, mask, index); `shared`: `Rows` of the segmentations and
  syntheses; `mask`: which rows are real examples (the rest pad the last batch); `index`: the
  real examples' indices in the split; `label`: (B, H, W) labels at the model's size.
  """

  def __init__(self, data: dict, shared: Rows):
    self.data, self.shared = data, shared
    self.mask = np.asarray(data["mask"]) > 0
    self.index = np.asarray(data["index"])[self.mask]
    self.label = np.asarray(data["label"])[..., 0]


class Metric:
  """Base of the metric evaluators. A subclass reads its options from `run.config.eval` in
  `__init__`, accumulates in `update` (state reset by `reset`), and reduces over processes in
  `result`. Names it reports that it cannot compute are None in the result with a reason in
  `skipped`."""

  uses: Tuple[str, ...] = ()  # SEGMENTATION, SYNTHESIS, NATIVE_LABELS: shared work it needs

  def __init__(self, run: Run):
    self.run = run
    self.skipped: Dict[str, str] = {}  # {metric name: why it is not computed}

  def network_evaluations(self) -> Dict[str, int]:
    """{metric name: UNet evaluations per example} of the names it reports."""
    return {}

  def reset(self) -> None:
    """Start a new evaluation (clear the sums)."""

  def device(self, params, batch: dict, shared: dict) -> dict:
    """Start this metric's own device programs on one batch (global arrays; or
    ShapeDtypeStructs, then only compile); returns their outputs by name."""
    return {}

  def update(self, batch: HostBatch, own: Rows) -> None:
    """Score one batch on the host (`own`: this process's rows of what `device` returned)."""

  def result(self, workdir: Optional[str]) -> dict:
    """{metric name: number or None}, combined over processes (collective)."""
    raise NotImplementedError

  def tensorboard(self, result: dict) -> Dict[str, float]:
    """Scalars beyond the result's own numbers, by tag (e.g. per-class IoU)."""
    return {}


class PerExample(Metric):
  """A metric that is the mean over examples of a value per example. Subclasses list the names
  they report (`names`) and return each name's values for a batch's real examples (`values`);
  they are stored at each example's index in the split and combined over processes bit for
  bit, so the means are those of one process whatever the number of processes."""

  def names(self) -> List[str]:
    raise NotImplementedError

  def values(self, batch: HostBatch, own: Rows) -> Dict[str, np.ndarray]:
    raise NotImplementedError

  def reset(self):
    self._values = {n: np.zeros(self.run.num_examples) for n in self.names()
                    if n not in self.skipped}

  def update(self, batch, own):
    for name, values in self.values(batch, own).items():
      self._values[name][batch.index] = values

  def result(self, workdir):
    out = dict.fromkeys(self.names())
    if self._values:
      combined = combine_disjoint(np.stack(list(self._values.values())))
      out.update({n: float(v.mean()) if v.size else None for n, v in zip(self._values, combined)})
    return out


class Confusions(Metric):
  """A metric that is the mIoU of confusion matrices summed over the split. Subclasses list the
  names they report (`names`) and return each name's confusion matrix of a batch
  (`confusions`); the matrices are summed exactly over processes."""

  def names(self) -> List[str]:
    raise NotImplementedError

  def confusions(self, batch: HostBatch, own: Rows) -> Dict[str, np.ndarray]:
    raise NotImplementedError

  def reset(self):
    c = self.run.model.num_classes
    self._confusion = {n: np.zeros((c, c), np.int64) for n in self.names()
                       if n not in self.skipped}

  def update(self, batch, own):
    for name, confusion in self.confusions(batch, own).items():
      self._confusion[name] += confusion

  def summed(self) -> Dict[str, np.ndarray]:
    """The confusion matrices of the whole split (collective)."""
    if not self._confusion:
      return {}
    return dict(zip(self._confusion, sum_over_processes(np.stack(list(
        self._confusion.values())))))

  def result(self, workdir):
    out = dict.fromkeys(self.names())
    out.update({n: metrics.iou_from_confusion(c)["miou"] for n, c in self.summed().items()})
    return out


def synthesis_network_evaluations(run: Run, names, extra: Optional[Sampler] = None) -> dict:
  """{name + suffix: UNet evaluations of one synthesis (+ `extra`'s)} per synthesis sampler."""
  more = flow.network_evaluations(extra[1], extra[0]) if extra else 0
  return {f"{name}{run.suffix(s)}": flow.network_evaluations(s[1], s[0]) + more
          for s in run.synth_samplers for name in names}


def names() -> List[str]:
  """Every metric evaluator in this package."""
  import semflow_jax.evaluators as package
  return sorted(m.name for m in pkgutil.iter_modules(package.__path__) if m.name != "common")


def load(name: str):
  """The `Metric` class of semflow_jax/evaluators/<name>.py."""
  module = f"semflow_jax.evaluators.{name}"
  if name.isidentifier() and name != "common":
    try:
      return importlib.import_module(module).Metric
    except ModuleNotFoundError as e:
      if e.name != module:
        raise
  raise ValueError(f"config.eval.metrics: no metric evaluator {name!r} (a file "
                   f"semflow_jax/evaluators/{name}.py); there are {names()}")


# -- sums over processes --------------------------------------------------------------------------
LIMB_BITS = 16  # int64 = 4 limbs; a uint32 holds the sum of 65536 processes' limbs
_LIMBS = 64 // LIMB_BITS
FIXED_POINT_BITS = 62  # floats are summed as integers: 62 bits below the largest magnitude


def to_limbs(x: np.ndarray) -> np.ndarray:
  """int64 (...,) -> uint32 (..., 4): its two's-complement bits, 16 at a time, lowest first."""
  bits = np.asarray(x, np.int64).view(np.uint64)
  shifts = np.arange(_LIMBS, dtype=np.uint64) * np.uint64(LIMB_BITS)
  return ((bits[..., None] >> shifts) & np.uint64(2**LIMB_BITS - 1)).astype(np.uint32)


def from_limbs(limb_sums: np.ndarray) -> np.ndarray:
  """Sums of `to_limbs` over processes (uint32 (..., 4)) -> the int64 sum (exact while it fits
  in int64: two's complement arithmetic modulo 2^64)."""
  sums = np.asarray(limb_sums, np.uint64)
  shifts = np.arange(_LIMBS, dtype=np.uint64) * np.uint64(LIMB_BITS)
  with np.errstate(over="ignore"):
    return (sums << shifts).sum(-1, dtype=np.uint64).view(np.int64)


def fixed_point_scale(exponent: int, num_processes: int) -> int:
  """The power of two that turns values below 2^exponent into integers of FIXED_POINT_BITS
  bits, with room for a sum over `num_processes` in int64."""
  return FIXED_POINT_BITS - int(np.ceil(np.log2(max(num_processes, 1)))) - int(exponent)


def largest_exponent(x: np.ndarray) -> int:
  """e with |x| < 2^e for every finite x (a very small e for all zeros)."""
  finite = np.abs(x[np.isfinite(x)])
  return int(np.frexp(finite.max())[1]) if finite.size and finite.max() > 0 else -1100


@functools.lru_cache(maxsize=None)
def _process_mesh(devices: Tuple) -> Mesh:
  """Every device, one row per process, in process order (each process's own, by id)."""
  rows = [sorted((d for d in devices if d.process_index == p), key=lambda d: d.id)
          for p in sorted({d.process_index for d in devices})]
  if len({len(r) for r in rows}) != 1:
    raise ValueError(f"processes have different numbers of devices {[len(r) for r in rows]}")
  return Mesh(np.asarray(rows), ("process", "device"))


@functools.lru_cache(maxsize=None)
def _reduction(mesh: Mesh, op: str):
  reduce = {"sum": jnp.sum, "max": jnp.max}[op]
  return jax.jit(lambda x: reduce(x, axis=0), out_shardings=NamedSharding(mesh, P("device")))


def _over_processes(words: np.ndarray, op: str) -> np.ndarray:
  """Elementwise sum or max of a flat 32-bit array over processes, via one collective over a
  global (processes, devices, n / devices) array: each device holds 1 / devices of this
  process's words and of the result, so memory does not grow with the number of processes."""
  mesh = _process_mesh(tuple(jax.devices()))
  per_device = mesh.devices.shape[1]
  n = len(words)
  m = max(1, -(-n // per_device))
  local = np.zeros((1, per_device, m), words.dtype)
  local.reshape(-1)[:n] = words
  spread = jax.make_array_from_process_local_data(
      NamedSharding(mesh, P("process", "device")), local, (mesh.devices.shape[0], per_device, m))
  out = _reduction(mesh, op)(spread)
  shards = {s.index[0].start or 0: np.asarray(s.data) for s in out.addressable_shards}
  return np.concatenate([shards[k] for k in sorted(shards)]).reshape(-1)[:n]


def sum_over_processes(x: np.ndarray) -> np.ndarray:
  """The sum of a host array over processes, the same on every process (collective).

  Integers (returned as int64) are summed exactly: as 16-bit limbs in uint32. Floats (returned
  as float64) are summed as integers too: scaled by one power of two (from the largest
  magnitude on any process) to 62-bit fixed point, so the sum does not depend on the order of
  the processes and, besides its rounding to float64, is off by at most P^2 2^-63 of the
  largest magnitude for P processes (2^-61 for two; a float64 sum of the same values can be
  2^10 times further off); a non-finite value on any process makes that element NaN. Memory
  per process: a few times the array, whatever the number of processes.
  """
  x = np.asarray(x)
  integer = np.issubdtype(x.dtype, np.integer) or x.dtype == bool
  count = jax.process_count()
  if count == 1:
    return x.astype(np.int64 if integer else np.float64)
  if integer:
    words = to_limbs(x.astype(np.int64).reshape(-1)).reshape(-1)
    return from_limbs(_over_processes(words, "sum").reshape(-1, _LIMBS)).reshape(x.shape)
  x = x.astype(np.float64)
  exponent = int(_over_processes(np.array([largest_exponent(x)], np.int32), "max")[0])
  scale = fixed_point_scale(exponent, count)
  finite = np.isfinite(x)
  fixed = np.rint(np.ldexp(np.where(finite, x, 0.0), scale)).astype(np.int64)
  both = np.concatenate([fixed.reshape(-1), (~finite).reshape(-1).astype(np.int64)])
  total = from_limbs(_over_processes(to_limbs(both).reshape(-1), "sum").reshape(-1, _LIMBS))
  values, bad = total[:x.size], total[x.size:]
  return np.where(bad > 0, np.nan, np.ldexp(values.astype(np.float64), -scale)).reshape(x.shape)


def combine_disjoint(x: np.ndarray) -> np.ndarray:
  """Per-example values that exactly one process wrote (at the example's index; zeros
  elsewhere), combined bit for bit: the sum of their bits is the writer's bits (collective)."""
  x = np.ascontiguousarray(np.asarray(x, np.float64))
  return sum_over_processes(x.view(np.int64)).view(np.float64)
