"""Every inference program of a run, built and jitted in one place.

Training-time evaluation, `--mode=eval`, the file CLI (segment, synthesize, edit, ...) and the
memory planner ask a `Programs` object for a program instead of calling `jax.jit` themselves. A
program is a SemFlow method, or a `controls` function applied to the model, with its static
arguments bound (integration steps, sampler, ...); the same name and arguments always return the
same `Program`, so each program compiles once per run (per input shape), however often
evaluation runs.

  programs = Programs(model)
  labels = programs.segment(steps=25, method="euler")(params, images)
  lowered = programs.segment(steps=25, method="euler").lower(abstract_params, abstract_images)
  # Compile ahead of time (e.g. beside the train step): ShapeDtypeStructs in, ShapeDtypeStructs
  # of the outputs back; a later call with arrays of those shapes runs that executable.
  out_shapes = programs.segment(steps=25, method="euler")(abstract_params, abstract_images)
"""

import functools
from typing import Callable

import jax
import jax.core  # a submodule that `import jax` does not bind (Tracer)
from absl import logging

from semflow_jax import anchors, controls
from semflow_jax.semflow import SemFlow


def _signature(x):
  """What a compiled executable requires of one argument leaf (None: not a concrete array or
  a ShapeDtypeStruct, e.g. numpy data or a tracer when the program is called inside jit)."""
  if isinstance(x, jax.core.Tracer):
    return None
  if isinstance(x, (jax.Array, jax.ShapeDtypeStruct)):
    return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)), x.sharding)
  return None


def _abstract(out_info):
  """ShapeDtypeStructs (shape, dtype, sharding) of a compiled program's outputs."""
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=s.sharding),
                      out_info)


class Program:
  """A jitted function and the executables compiled ahead of time for it.

  Called with arrays, it runs. Called with `jax.ShapeDtypeStruct`s (with shardings; arrays may
  be mixed in) it compiles for exactly those arguments, keeps the executable and returns the
  outputs' ShapeDtypeStructs, so a chain of programs (synthesise, quantise, segment the result)
  compiles as a whole from abstract inputs. A later call whose arguments have the shapes,
  dtypes and shardings of a kept executable runs that executable: compiling early (before the
  first training step) and running later compile once. Other arguments go through `jax.jit`.
  """

  def __init__(self, fn: Callable, name: str = "", **jit_kwargs):
    self.name = name or getattr(fn, "__name__", "program")
    # A function object of its own: jit's executables are kept per function, and two Programs
    # of one function (two evaluators' quantisation) must count their own.
    self.jitted = jax.jit(functools.partial(fn), **jit_kwargs)
    self._executables = {}

  def lower(self, *args) -> jax.stages.Lowered:
    return self.jitted.lower(*args)

  def __call__(self, *args):
    leaves, tree = jax.tree.flatten(args)
    signature = tuple(_signature(x) for x in leaves)
    key = (tree, signature)
    executable = self._executables.get(key)
    if any(isinstance(x, jax.ShapeDtypeStruct) for x in leaves):
      if executable is None:
        executable = self._executables[key] = self.jitted.lower(*args).compile()
      return _abstract(executable.out_info)
    if executable is not None:
      return executable(*args)
    if self._executables and None not in signature and self.num_executables == len(
        self._executables):  # the first compile by jit after ahead-of-time ones: say so
      logging.warning("program %s was compiled ahead of time for other shapes or shardings; "
                      "compiling it again for these", self.name)
    return self.jitted(*args)

  @property
  def num_executables(self) -> int:
    """How many times this program has been compiled (ahead of time and by jit)."""
    return len(self._executables) + self.jitted._cache_size()  # pyright: ignore[reportAttributeAccessIssue]


class Programs:
  """Jitted SemFlow methods (`Program`s), cached by (method name, static keyword arguments)."""

  def __init__(self, model: SemFlow):
    self.model = model
    self._cache = {}

  def get(self, name: str, **static) -> Program:
    """The jitted `model.<name>`, or `controls.<name>` applied to the model, with `static`
    bound (all keyword arguments, all hashable)."""
    key = (name, tuple(sorted(static.items())))
    if key not in self._cache:
      method = getattr(self.model, name, None)
      if method is None and name in controls.PROGRAMS:
        method = functools.partial(getattr(controls, name), self.model)
      if method is None or not callable(method):
        raise AttributeError(f"SemFlow has no program {name!r}")
      label = name + "".join(f" {k}={v}" for k, v in key[1])
      self._cache[key] = Program(functools.partial(method, **static), name=label)
    return self._cache[key]

  def segment(self, steps: int, method: str) -> Program:
    """(params, uint8 images (B, H, W, 3)) -> int32 labels (B, H, W)."""
    return self.get("segment", steps=int(steps), method=method)

  def synthesize(self, steps: int, method: str) -> Program:
    """(params, labels (B, H, W[, 1]), rng) -> images in [-1, 1] (B, H, W, 3)."""
    return self.get("synthesize", steps=int(steps), method=method)

  def edit(self, steps: int, method: str, blend: bool) -> Program:
    """(params, uint8 images, source labels, target labels) -> edited images in [-1, 1]."""
    return self.get("edit", steps=int(steps), method=method, blend=bool(blend))

  def synthesize_styled(self, strength: float, steps: int, method: str,
                        colour_transfer: bool = False, refine: int = 0) -> Program:
    """(params, labels, uint8 references, rng) -> images in [-1, 1] in the references' style."""
    return self.get("synthesize_styled", strength=float(strength), steps=int(steps),
                    method=method, colour_transfer=bool(colour_transfer), refine=int(refine))

  def resample(self, steps: int, method: str, blend: bool = False) -> Program:
    """(params, labels, bool region, rng, new_rng) -> images in [-1, 1], re-sampled in region."""
    return self.get("resample", steps=int(steps), method=method, blend=bool(blend))

  def compiled(self) -> dict[str, int]:
    """{program label: executables compiled so far} for every program asked for (a progress and
    start-up log line: which programs a run has paid to compile)."""
    return {program.name: program.num_executables for program in self._cache.values()}

  @functools.cached_property
  def to_uint8(self) -> Program:
    """Images in [-1, 1] -> uint8, on the device (as a saved image would be quantised)."""
    return Program(anchors.from_unit_range, name="to_uint8")
