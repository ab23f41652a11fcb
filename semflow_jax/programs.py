"""Every inference program of a run, built and jitted in one place.

Training-time evaluation, `--mode=eval`, the file CLI (segment, synthesize, edit, ...) and the
memory planner ask a `Programs` object for a program instead of calling `jax.jit` themselves. A
program is a SemFlow method, or a `controls` function applied to the model, with its static
arguments bound (integration steps, sampler, ...); the same name and arguments always return the
same jitted function, so each program compiles once per run (per input shape), however often
evaluation runs.

  programs = Programs(model)
  labels = programs.segment(steps=25, method="euler")(params, images)
  lowered = programs.segment(steps=25, method="euler").lower(abstract_params, abstract_images)
"""

import functools
from typing import Callable

import jax

from semflow_jax import anchors, controls
from semflow_jax.semflow import SemFlow


class Programs:
  """Jitted SemFlow methods, cached by (method name, static keyword arguments)."""

  def __init__(self, model: SemFlow):
    self.model = model
    self._cache = {}

  def get(self, name: str, **static) -> Callable:
    """The jitted `model.<name>`, or `controls.<name>` applied to the model, with `static`
    bound (all keyword arguments, all hashable)."""
    key = (name, tuple(sorted(static.items())))
    if key not in self._cache:
      method = getattr(self.model, name, None)
      if method is None and name in controls.PROGRAMS:
        method = functools.partial(getattr(controls, name), self.model)
      if method is None or not callable(method):
        raise AttributeError(f"SemFlow has no program {name!r}")
      self._cache[key] = jax.jit(functools.partial(method, **static))
    return self._cache[key]

  def segment(self, steps: int, method: str) -> Callable:
    """(params, uint8 images (B, H, W, 3)) -> int32 labels (B, H, W)."""
    return self.get("segment", steps=int(steps), method=method)

  def synthesize(self, steps: int, method: str) -> Callable:
    """(params, labels (B, H, W[, 1]), rng) -> images in [-1, 1] (B, H, W, 3)."""
    return self.get("synthesize", steps=int(steps), method=method)

  def edit(self, steps: int, method: str, blend: bool) -> Callable:
    """(params, uint8 images, source labels, target labels) -> edited images in [-1, 1]."""
    return self.get("edit", steps=int(steps), method=method, blend=bool(blend))

  def synthesize_styled(self, strength: float, steps: int, method: str,
                        colour_transfer: bool = False, refine: int = 0) -> Callable:
    """(params, labels, uint8 references, rng) -> images in [-1, 1] in the references' style."""
    return self.get("synthesize_styled", strength=float(strength), steps=int(steps),
                    method=method, colour_transfer=bool(colour_transfer), refine=int(refine))

  def resample(self, steps: int, method: str, blend: bool = False) -> Callable:
    """(params, labels, bool region, rng, new_rng) -> images in [-1, 1], re-sampled in region."""
    return self.get("resample", steps=int(steps), method=method, blend=bool(blend))

  @functools.cached_property
  def to_uint8(self) -> Callable:
    """Images in [-1, 1] -> uint8, on the device (as a saved image would be quantised)."""
    return jax.jit(anchors.from_unit_range)

  def compiled(self) -> list:
    """(name, static arguments) of every program asked for so far (for logs and the planner)."""
    return [(name, dict(static)) for name, static in self._cache]
