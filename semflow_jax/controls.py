"""Controls that one deterministic ODE in both directions makes possible, on any trained SemFlow.

Plain functions of (model, params, batch, ...): batched, jittable (`Programs` jits them with the
keyword-only arguments static), in pixel and SD latent space alike. No I/O. Time: t = 0 image,
t = 1 mask.

- `edit`: change a real photo through its label map. Integrate the photo forward to its end
  point (its anchor latent plus a residual that carries the photo's appearance), move the end
  point by the anchor-latent difference where the labels changed, integrate back. With
  `blend=True`, outside the edited region the backward pass is pinned to the photo's own forward
  trajectory at every step (so it ends at the photo's latent there).
- `synthesize_styled`: start at t_s = `strength` from (1 - t_s) z_ref + t_s z_mask and integrate
  to 0 (t_s = 1 is plain synthesis, exactly); optional Lab colour transfer to the reference and
  `refine` further rounds that restart from the result (IIDM's refinement).
- `resample`: new perturbation noise only inside a region (chosen classes or any binary mask),
  the original noise elsewhere; `blend=True` also pins the outside to the original trajectory.
- `ensemble`: parameters whose velocity is the mean over several checkpoints; every method and
  control above then integrates the averaged field, in both directions.
"""

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from semflow_jax import anchors, colour, flow
from semflow_jax.semflow import FROZEN, SemFlow

# The functions of (model, params, ...) that `programs.Programs` jits by name.
PROGRAMS = ("edit", "synthesize_styled", "resample")


# -- integration helpers ---------------------------------------------------------------------
def integrate_pinned(velocity_fn, z, t_start: float, t_end: float, steps: int, method: str,
                     keep, kept_trajectory):
  """`flow.integrate`, except that the elements where `keep` is True are set to
  `kept_trajectory` (the states of another solve over the same times, `flow.trajectory`) at the
  start and after every step: they follow that trajectory exactly, and the rest evolve with it
  as context (RePaint-style blending, for a deterministic ODE)."""
  step = flow.step_function(velocity_fn, t_start, t_end, steps, method)
  return jax.lax.fori_loop(0, steps, lambda i, z: jnp.where(keep, kept_trajectory[i + 1],
                                                            step(i, z)),
                           jnp.where(keep, kept_trajectory[0], z))


def latent_mask(model: SemFlow, region):
  """bool (B, H, W) pixel region -> bool (B, h, w, 1) at the latent resolution: a latent cell is
  in the region when any of its pixels is."""
  region = jnp.asarray(region, bool)
  b, height, width = region.shape
  h, w = model.latent_shape[:2]
  if height % h or width % w:
    raise ValueError(f"region {height}x{width} does not tile the {h}x{w} latent")
  return region.reshape(b, h, height // h, w, width // w).any(axis=(2, 4))[..., None]


def _fold_in(rng, data: int):
  """fold_in for one key or for one key per example."""
  if anchors.is_key_batch(rng):
    return jax.vmap(lambda key: jax.random.fold_in(key, data))(rng)
  return jax.random.fold_in(rng, data)


def _decode_image(model, params, z):
  return jnp.clip(model.decode(params, z), -1.0, 1.0)


# -- 1. editing a real photo -----------------------------------------------------------------
def edit(model: SemFlow, params, images, source_labels, target_labels, *, steps: int = 25,
         method: str = "euler", blend: bool = False):
  """Photos uint8 (B, H, W, 3) edited from `source_labels` (their segmentation) to
  `target_labels` (both (B, H, W[, 1]); 255 in the target keeps the source label) -> images in
  [-1, 1]. The edited region is where the two label maps differ."""
  source = jnp.asarray(source_labels).reshape(images.shape[:3]).astype(jnp.int32)
  target = jnp.asarray(target_labels).reshape(images.shape[:3]).astype(jnp.int32)
  target = jnp.where(target == anchors.IGNORE_LABEL, source, target)
  region = latent_mask(model, source != target)
  velocity = functools.partial(model.velocity, params)
  z0 = model.encode_image(params, images)
  if blend:
    forward = flow.trajectory(velocity, z0, 0.0, 1.0, steps, method)
    z1 = forward[-1]
  else:
    z1 = flow.integrate(velocity, z0, 0.0, 1.0, steps, method)
  # Unperturbed anchor latents: the end point keeps its own residual (the photo's appearance).
  shift = model.encode_labels(params, target) - model.encode_labels(params, source)
  z1 = z1 + jnp.where(region, shift, 0.0)
  if blend:
    z = integrate_pinned(velocity, z1, 1.0, 0.0, steps, method, ~region, forward[::-1])
  else:
    z = flow.integrate(velocity, z1, 1.0, 0.0, steps, method)
  return _decode_image(model, params, z)


# -- 2. style-reference synthesis ------------------------------------------------------------
def synthesize_styled(model: SemFlow, params, labels, references, rng, *, strength: float,
                      steps: int = 25, method: str = "euler", colour_transfer: bool = False,
                      refine: int = 0):
  """Labels (B, H, W[, 1]) in the style of uint8 `references` (B, H, W, 3) -> images in [-1, 1].

  Starts at t_s = `strength` from (1 - t_s) E(reference) + t_s z_mask (z_mask as `synthesize`
  draws it from `rng`) and integrates to 0 in round(steps * t_s) steps (at least one), the step
  size of `synthesize`. t_s = 1 is `model.synthesize(params, labels, rng, steps, method)`; t_s = 0
  returns the reference. `colour_transfer` matches the result's Lab mean and standard deviation
  to the reference's; each of `refine` further rounds restarts from the (quantised) result the
  same way, with fresh perturbation noise.
  """
  if not 0.0 <= strength <= 1.0:
    raise ValueError(f"strength={strength} must be in [0, 1]")
  if refine < 0:
    raise ValueError(f"refine={refine} must be >= 0")
  n = max(1, round(steps * strength))
  velocity = functools.partial(model.velocity, params)
  start_images = references
  for r in range(refine + 1):
    z_mask = model.encode_labels(params, labels, rng if r == 0 else _fold_in(rng, r))
    z_ref = model.encode_image(params, start_images)
    z = (1.0 - strength) * z_ref + strength * z_mask
    x = _decode_image(model, params, flow.integrate(velocity, z, strength, 0.0, n, method))
    if colour_transfer:
      x = colour.transfer(x, anchors.to_unit_range(references))
    start_images = anchors.from_unit_range(x)  # as the result would be saved and read back
  return x


# -- 3. regional re-sampling -----------------------------------------------------------------
def resample(model: SemFlow, params, labels, region, rng, new_rng, *, steps: int = 25,
             method: str = "euler", blend: bool = False):
  """Re-sample the pixels in `region` (bool (B, H, W)) of `model.synthesize(params, labels, rng)`:
  perturbation noise from `new_rng` inside the region, from `rng` (the original sample's)
  everywhere else. An empty region gives the original sample (bit for bit with per-pixel
  noise; with coarse grids to float rounding, as XLA may fuse their resize differently in the
  two programs). With `blend`, the
  latents outside the region also follow the original sample's trajectory at every step, so
  the image changes only where the region's latent cells reach."""
  original = model.perturbation_noise(rng, labels)
  noise = jnp.where(jnp.asarray(region, bool)[..., None], model.perturbation_noise(new_rng, labels),
                    original)
  velocity = functools.partial(model.velocity, params)
  z1 = model.encode_labels(params, labels, noise=noise)
  if blend:
    kept = flow.trajectory(velocity, model.encode_labels(params, labels, noise=original), 1.0, 0.0,
                      steps, method)
    z = integrate_pinned(velocity, z1, 1.0, 0.0, steps, method, ~latent_mask(model, region), kept)
  else:
    z = flow.integrate(velocity, z1, 1.0, 0.0, steps, method)
  return _decode_image(model, params, z)


# -- 4. checkpoint ensembles -----------------------------------------------------------------
def ensemble(members: Sequence[dict], names: Optional[Sequence[str]] = None) -> dict:
  """Parameters of several checkpoints of one model -> ensemble parameters: the UNets as a tuple
  (SemFlow.velocity averages their velocities), the frozen parts (VAE, text embedding) shared,
  which must be identical across members."""
  if not members:
    raise ValueError("an ensemble needs at least one member")
  names = list(names) if names is not None else [f"member {i}" for i in range(len(members))]
  first = members[0]
  for name, member in zip(names[1:], members[1:]):
    if set(member) != set(first):
      raise ValueError(f"{name}: parameter groups {sorted(member)} differ from {names[0]}'s "
                       f"{sorted(first)}")
    for key in FROZEN:
      if key in first and not all(
          np.array_equal(a, b) for a, b in zip(jax.tree.leaves(first[key]),
                                               jax.tree.leaves(member[key]))):
        raise ValueError(f"{name}: its frozen '{key}' parameters differ from {names[0]}'s; an "
                         "ensemble averages UNets that share one autoencoder and text embedding")
  return {**first, "unet": tuple(m["unet"] for m in members)}
