"""A trained run's UNet -> a diffusers `UNet2DConditionModel` folder that PyTorch users load.

  python -m semflow_jax.export --workdir=runs/cityscapes --output=exported/cityscapes_unet

The output folder (local or gs://) holds what `UNet2DConditionModel.from_pretrained(DIR)` reads
(`config.json`, `diffusion_pytorch_model.safetensors`), the empty-prompt text embedding the UNet
attends to (`empty_prompt_embedding.npy`, (1, tokens, width) float32), and the conventions
needed to use it (`semflow.json`: time direction and timestep scaling, latent scaling, the
anchor palette, the perturbation, the classes, the sampler; `README.md`: the same in prose with
a PyTorch example). The weights are the EMA parameters when the run kept them (`--noema`: the
trained ones) of the latest checkpoint; the config is the run's `config.json` (or `--config`).

Keys are the converter's mapping run backwards: every key of diffusers' own model goes through
`weights.flax_path`, the parameter at that path is transposed back (HWIO -> OIHW, (in, out) ->
(out, in)) and its shape checked against diffusers' tensor, so any key the converter reads, the
export writes. Only SD-shaped UNets (`config.model.unet='sd'`) have a diffusers equivalent; the
small pixel-space UNet is refused in one line. Needs torch and diffusers
(`pip install -e ".[convert]"`). The output is staged beside DIR and moved into place, with
`semflow.json` written last.
"""

import io
import os
import sys
import tempfile
from typing import Optional

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from flax import traverse_util

from semflow_jax import cli, parallel, state, storage
from semflow_jax.checkpoint import ConversionError
from semflow_jax.semflow import SemFlow
from semflow_jax.weights import flax_path, to_torch

WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"
CONTEXT_FILE = "empty_prompt_embedding.npy"
CONVENTIONS_FILE = "semflow.json"


class ExportError(ValueError):
  """The run cannot be exported (one line naming what and why)."""


def unet_state_dict(unet_params, diffusers_unet) -> dict:
  """{PyTorch key: float32 numpy array} for `diffusers_unet` (a UNet2DConditionModel, possibly
  on the meta device: only its keys and shapes are read) from our UNet parameters; every key of
  both sides must be used, and every shape must match."""
  flat = {k: np.asarray(v, np.float32)
          for k, v in traverse_util.flatten_dict(jax.device_get(unet_params)).items()}
  expected = {k: tuple(v.shape) for k, v in flat.items()}
  out, problems, used = {}, [], set()
  for key, tensor in diffusers_unet.state_dict().items():
    path = flax_path(key, expected)
    if path not in flat:
      problems.append(f"{key}: no parameter {'/'.join(path)}")
      continue
    value = to_torch(flat[path], tensor.shape)
    if value.shape != tuple(tensor.shape):
      problems.append(f"{key}: {tuple(tensor.shape)} in diffusers, {value.shape} from "
                      f"{'/'.join(path)}")
      continue
    out[key] = np.ascontiguousarray(value)
    used.add(path)
  problems += [f"{'/'.join(p)}: no diffusers key" for p in flat if p not in used]
  if problems:
    raise ExportError("the UNet does not map onto diffusers' UNet2DConditionModel: "
                      + "; ".join(problems[:10]))
  return out


def conventions(config: ml_collections.ConfigDict, model: SemFlow, step: int, weights: str,
                workdir: str) -> dict:
  """What a PyTorch user needs beside the weights to segment and synthesise like the run."""
  from semflow_jax.data import classes
  palette = model.palette
  try:
    names = list(classes.of(config.data).names)
  except (ValueError, OSError):  # a folder dataset whose classes.json is out of reach
    names = [f"class_{i}" for i in range(model.num_classes)]
  to_255 = lambda c: [round((v + 1.0) * 127.5, 3) for v in c]
  return {
      "source": {"workdir": workdir, "step": step, "weights": weights},
      "time": ("t = 0 is the image latent, t = 1 the mask's anchor latent; dz/dt = "
               "unet(z_t, timestep = 1000 t, encoder_hidden_states = empty_prompt_embedding)"
               + (" + (2t - 1) z_t (input_skip)" if model.input_skip else "")
               + "; segment: integrate t 0 -> 1, decode, nearest anchor; synthesise: "
               "integrate t 1 -> 0 from the perturbed anchor latent, decode"),
      "timestep_scale": 1000.0,
      "input_skip": bool(model.input_skip),
      "latents": {"scaling_factor": float(model.autoencoder.scaling_factor),
                  "shift_factor": float(getattr(model.autoencoder, "shift_factor", 0.0) or 0.0),
                  "image": "the VAE posterior mean of the image in [-1, 1], times scaling_factor",
                  "mask": "the VAE posterior mean of the perturbed anchor image, times "
                          "scaling_factor",
                  "latent_shape_hwc": list(model.latent_shape)},
      "image_size_hw": list(model.image_size),
      "num_classes": model.num_classes,
      "class_names": names,
      "palette": {"name": palette.name,
                  "anchors_unit": [list(c) for c in palette.colours],
                  "anchors_0_255": [to_255(c) for c in palette.colours],
                  "ignore_unit": list(palette.ignore), "ignore_label": 255,
                  "rule": "class c is drawn in anchors[c]; label 255 (ignore) in the ignore "
                          "colour; a decoded pixel's class is its nearest anchor"},
      "perturbation": {"fraction": float(model.perturbation),
                       "half_spacing_unit": palette.half_spacing,
                       "amplitude_unit": float(model.perturbation) * palette.half_spacing,
                       "grids": list(model.perturbation_grids),
                       "rule": "anchor image + amplitude x the mean over grids g of noise in "
                               "[-1, 1] per channel (g = 0: per pixel; g > 0: drawn on a g x g "
                               "grid and upsampled bilinearly), in [-1, 1] units"},
      "sampler": {"method": config.sample.method, "segment_steps": config.sample.seg_steps,
                  "synthesize_steps": config.sample.synth_steps},
      "files": {"weights": WEIGHTS_FILE, "config": "config.json",
                "encoder_hidden_states": CONTEXT_FILE},
  }


_README = """# SemFlow UNet (exported by semflow_jax)

A diffusers `UNet2DConditionModel` trained as SemFlow's velocity field (Wang et al., NeurIPS
2024) by semflow_jax: `{workdir}` at step {step} ({weights} weights). `semflow.json` holds
every convention below as data.

- Time: t = 0 is the image latent, t = 1 the mask's anchor latent. The velocity is
  `unet(z_t, 1000 * t, encoder_hidden_states=context).sample`{skip}, with `context` the
  empty-prompt text embedding in `{context}`.
- Latents: the SD VAE's posterior mean times {scaling} (the VAE the run started from; training
  does not change it). Images in [-1, 1].
- Masks: class c is drawn as the anchor colour `palette.anchors_unit[c]` ({palette} palette,
  {k} classes), ignore (255) as `palette.ignore_unit`; synthesis starts from the anchor image
  plus the perturbation of `semflow.json`; segmentation decodes and takes the nearest anchor.
- Sampler of the run: {method}, {seg} steps to segment (t 0 -> 1), {synth} to synthesise
  (t 1 -> 0).

```python
import numpy as np, torch
from diffusers import UNet2DConditionModel
unet = UNet2DConditionModel.from_pretrained("DIR").eval()
context = torch.from_numpy(np.load("DIR/{context}"))
z = torch.randn(1, {latent_c}, {latent_h}, {latent_w}); t = torch.tensor([0.5])
with torch.no_grad():
  v = unet(z, 1000 * t, encoder_hidden_states=context.expand(len(z), -1, -1)).sample
```
"""


def _read_config(workdir: str, config: Optional[ml_collections.ConfigDict]):
  if config is not None:
    return config
  path = storage.join(workdir, "config.json")
  if not storage.is_file(path):
    raise ExportError(f"{path}: no such file (the run's config, written by training); pass "
                      "--config=... as the run was trained")
  return ml_collections.ConfigDict(storage.read_json(path))


def export(workdir: str, output: str, config: Optional[ml_collections.ConfigDict] = None,
           ema: bool = True, overwrite: bool = False) -> str:
  """Write the diffusers folder of `workdir`'s latest checkpoint to `output`; returns its path."""
  workdir, output = storage.resolve(workdir), storage.resolve(output)
  if storage.exists(output) and not overwrite:
    raise ExportError(f"{output} already exists (pass --overwrite to replace it)")
  config = _read_config(workdir, config)
  if config.model.get("unet", "small") != "sd":
    raise ExportError(
        f"{workdir} holds the small pixel-space UNet (config.model.unet="
        f"{config.model.get('unet', 'small')!r}), which has no diffusers equivalent; only SD "
        "UNets (config.model.unet='sd', e.g. configs/sd15.py and the dataset recipes) export as "
        "UNet2DConditionModel")
  try:
    import diffusers
    import torch
    from safetensors.numpy import save_file
  except ImportError as e:
    raise ExportError(f"exporting needs torch, diffusers and safetensors ({e}); pip install -e "
                      "'.[convert]'") from None
  mesh = parallel.make_mesh(config, jax.local_devices()[:1])
  model = SemFlow.from_config(config, mesh)
  params, step = state.load_params(config, workdir, mesh, use_ema=ema)
  used_ema = ema and config.train.ema_decay > 0
  diffusers_config = {"_class_name": "UNet2DConditionModel",
                      "_diffusers_version": diffusers.__version__,
                      **model.unet.config.to_diffusers(),
                      "sample_size": int(model.latent_shape[0])}
  with torch.device("meta"):  # keys and shapes only: nothing allocated
    reference = diffusers.UNet2DConditionModel.from_config(diffusers_config)
  weights = unet_state_dict(params["unet"], reference)
  context = np.asarray(jax.device_get(params["context"]), np.float32)
  info = conventions(config, model, step, "ema" if used_ema else "params", workdir)

  staging = storage.staging_dir(output)
  try:
    buffer = io.BytesIO()
    np.save(buffer, context)
    storage.write_bytes(storage.join(staging, CONTEXT_FILE), buffer.getvalue())
    _write_safetensors(storage.join(staging, WEIGHTS_FILE), weights, save_file)
    storage.write_json(storage.join(staging, "config.json"), diffusers_config)
    latent = model.latent_shape
    storage.write_text(storage.join(staging, "README.md"), _README.format(
        workdir=workdir, step=step, weights=info["source"]["weights"],
        skip=" + (2t - 1) z_t" if model.input_skip else "", context=CONTEXT_FILE,
        scaling=info["latents"]["scaling_factor"], palette=model.palette.name,
        k=model.num_classes, method=config.sample.method, seg=config.sample.seg_steps,
        synth=config.sample.synth_steps, latent_c=latent[2], latent_h=latent[0],
        latent_w=latent[1]))
    storage.remove_tree(output)  # --overwrite
    storage.move_tree(staging, output)
    storage.write_json(storage.join(output, CONVENTIONS_FILE), info)  # last: marks it complete
  except BaseException:
    storage.remove_tree(staging)
    raise
  logging.info("exported the UNet of %s (step %d, %s) to %s", workdir, step,
               info["source"]["weights"], output)
  return output


def _write_safetensors(path: str, tensors: dict, save_file) -> None:
  """safetensors writes a local file: written in a temporary directory, then stored."""
  with tempfile.TemporaryDirectory(prefix="semflow_jax_export_") as tmp:
    local = os.path.join(tmp, WEIGHTS_FILE)
    save_file(tensors, local, metadata={"format": "pt"})
    with open(local, "rb") as f:
      storage.write_bytes(path, f.read())


# -- command line ----------------------------------------------------------------------------------
def _define_flags():
  """Defined only when run as a program (tests import the module's functions)."""
  from ml_collections import config_flags
  flags.DEFINE_string("workdir", None, "The trained run (its latest checkpoint and config.json).")
  flags.DEFINE_string("output", None, "The diffusers UNet folder to write (local or gs://).")
  flags.DEFINE_bool("ema", True, "The EMA parameters when the run kept them; --noema: the "
                    "trained parameters.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing output folder.")
  config_flags.DEFINE_config_file("config", None, "The run's config if its config.json is "
                                  "missing, optionally with :argument.", lock_config=True)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from semflow_jax import runtime
  runtime.configure_process()  # exporting needs no TPU: no TPU start-up without TPUs
  f = flags.FLAGS
  if not f.workdir or not f.output:
    raise app.UsageError("--workdir and --output are required")
  try:
    storage.check(f.workdir, "--workdir")
    storage.check(f.output, "--output", write=True)
    export(f.workdir, f.output, f.config, f.ema, f.overwrite)
  except (ExportError, ConversionError, FileNotFoundError, storage.StorageError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


if __name__ == "__main__":
  _define_flags()
  app.run(main, flags_parser=cli.parse_flags)
