"""PyTorch weights and the converted ones: the loaders that the converter CLIs
(`semflow_jax.convert`, `semflow_jax.convert_eval_nets`), `semflow_jax.export` and evaluation
(`evaluators/fid.py`, `evaluators/lpips.py`) share.

- Reading PyTorch state dicts (`read_state_dict`: a .safetensors or .bin file, or a diffusers
  model folder, local or gs://) and diffusers configs (`read_config`).
- The key mapping, both directions: keys are renamed mechanically (`flax_path`:
  `down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/kernel`), tensors
  transposed (`to_flax`: OIHW -> HWIO, (out, in) -> (in, out); `to_torch` backwards), and
  `convert_state_dict` checks every shape against `jax.eval_shape` of the Linen module, naming
  every missing, unexpected and mis-shaped key.
- The converted FID and LPIPS networks (`load_inception`, `load_lpips`), read from the
  directories `semflow_jax.convert_eval_nets` writes (`<dir>/inception`, `<dir>/lpips`).
"""

import json
import re
from typing import Dict, Tuple

import numpy as np
from flax import traverse_util

from semflow_jax import checkpoint, storage
from semflow_jax.checkpoint import ConversionError
from semflow_jax.models import inception as inception_lib
from semflow_jax.models import lpips as lpips_lib

INCEPTION = "inception"  # the converted networks' folders inside config.eval.*_weights
LPIPS = "lpips"

_WEIGHT_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
                 "model.safetensors", "pytorch_model.bin")
# Older VAE checkpoints name the mid-block attention like this (diffusers renames on load too).
_LEGACY_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


# -- reading ---------------------------------------------------------------------------------------
def _read_file(path: str) -> Dict[str, np.ndarray]:
  if path.endswith(".safetensors"):
    from safetensors.numpy import load_file
    try:
      return load_file(path)
    except Exception as e:  # bfloat16 tensors need torch; fall through to it
      if "bfloat16" not in str(e).lower() and "bf16" not in str(e).lower():
        raise ConversionError(f"{path}: not a readable safetensors file ({e})") from e
      from safetensors.torch import load_file as load_torch
      return {k: v.float().numpy() for k, v in load_torch(path).items()}
  try:
    import torch
  except ImportError as e:
    raise ConversionError(f"{path}: reading PyTorch .bin files needs torch "
                          "(pip install 'semflow_jax[convert]')") from e
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:
    raise ConversionError(f"{path}: not a readable PyTorch state dict ({e})") from e
  for wrapper in ("state_dict", "model", "module"):  # common training-script wrappers
    if isinstance(obj, dict) and set(obj) == {wrapper}:
      obj = obj[wrapper]
  if not isinstance(obj, dict):
    raise ConversionError(f"{path}: expected a state dict, found {type(obj).__name__}")
  return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in obj.items()}


def weight_files(folder: str) -> list:
  """The files of a model folder (local or gs://) that hold its weights, as a reader would pick
  them: a sharded checkpoint's index and shards, else the first of the usual names, else the one
  weights file there. Other variants beside them (fp16, non-EMA, .bin copies) are not read."""
  names = storage.listdir(folder)
  index = sorted(f for f in names if f.endswith(".index.json"))
  if index:  # sharded checkpoint: the index (first) maps every key to its shard
    shards = storage.read_json(storage.join(folder, index[0]))["weight_map"].values()
    return [index[0], *sorted(set(shards))]
  for name in _WEIGHT_NAMES:
    if name in names:
      return [name]
  variants = [f for f in names if f.endswith((".safetensors", ".bin"))]
  if len(variants) == 1:  # e.g. diffusion_pytorch_model.fp16.safetensors
    return variants
  raise ConversionError(f"{folder}: no weights file (looked for {', '.join(_WEIGHT_NAMES)}; "
                        f"found {variants or 'none'})")


def read_state_dict(path: str) -> Dict[str, np.ndarray]:
  """float32 numpy arrays by PyTorch key, from a weights file or a diffusers model folder
  (local or gs://; a folder is listed in place and only the weight files read are fetched)."""
  if storage.is_dir(path):
    out = {}
    for name in weight_files(path):
      if not name.endswith(".index.json"):
        out.update(_read_weights(storage.join(path, name)))
    return _clean(out)
  if not storage.exists(path):
    raise ConversionError(f"{path}: no such file")
  return _clean(_read_weights(path))


def _read_weights(path: str) -> Dict[str, np.ndarray]:
  with storage.local_copy(path) as local:  # the readers need a local file
    return _read_file(local)


def _clean(state_dict):
  out = {}
  for key, value in state_dict.items():
    for prefix in ("module.", "unet."):  # DDP / pipeline-level prefixes
      if key.startswith(prefix):
        key = key[len(prefix):]
    out[key] = np.asarray(value, np.float32)
  return out


def read_config(path: str) -> dict:
  """A diffusers config.json, or the one in a model folder (local, or gs://)."""
  file = storage.join(path, "config.json") if storage.is_dir(path) else path
  if not storage.exists(file):
    raise ConversionError(f"{file}: no such file (a diffusers model folder has a config.json)")
  try:
    return storage.read_json(file)
  except json.JSONDecodeError as e:
    raise ConversionError(f"{file}: not valid JSON ({e})") from e


# -- renaming and checking -------------------------------------------------------------------------
def flax_path(torch_key: str, expected) -> Tuple[str, ...]:
  """The Flax parameter path of a PyTorch key (`down_blocks.0.resnets.1.conv1.weight` ->
  ('down_blocks_0', 'resnets_1', 'conv1', 'kernel')); `expected` (the model's flattened paths)
  decides whether a `weight` is a kernel, a scale or an embedding."""
  parts = torch_key.split(".")
  if len(parts) >= 2 and parts[-2] in _LEGACY_ATTENTION and "attentions" in torch_key:
    parts = parts[:-2] + _LEGACY_ATTENTION[parts[-2]].split(".") + parts[-1:]
  key = re.sub(r"\.(\d+)(?=\.|$)", r"_\1", ".".join(parts))
  path = tuple(key.split("."))
  if path[-1] == "weight":
    for name in ("kernel", "scale", "embedding"):
      if path[:-1] + (name,) in expected:
        return path[:-1] + (name,)
    return path[:-1] + ("kernel",)
  return path


def to_flax(array: np.ndarray, expected_shape) -> np.ndarray:
  """A PyTorch tensor -> the layout of a Flax parameter of `expected_shape` (OIHW -> HWIO,
  (out, in) -> (in, out); 1x1 convolutions and linears stand in for each other)."""
  if array.ndim == 4:                      # conv OIHW -> HWIO
    array = array.transpose(2, 3, 1, 0)
    if len(expected_shape) == 2 and array.shape[:2] == (1, 1):  # 1x1 conv stored for a linear
      array = array[0, 0]
  elif array.ndim == 2:                    # linear (out, in) -> (in, out)
    array = array.T
    if len(expected_shape) == 4 and expected_shape[:2] == (1, 1):
      array = array[None, None]
  return array


def convert_state_dict(state_dict: Dict[str, np.ndarray], abstract_params,
                       source: str = "state dict") -> dict:
  """PyTorch state dict -> Flax params shaped like `abstract_params` (from jax.eval_shape).

  Raises ConversionError naming every missing, unexpected and mis-shaped key.
  """
  expected = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(abstract_params).items()}  # pyright: ignore[reportAttributeAccessIssue]
  converted, unexpected, mismatched, mismatched_paths = {}, [], [], set()
  for torch_key, array in state_dict.items():
    path = flax_path(torch_key, expected)
    if path not in expected:
      unexpected.append(torch_key)
      continue
    value = to_flax(array, expected[path])
    if value.shape != expected[path]:
      mismatched.append(f"{torch_key}: {tuple(array.shape)} in the file, the model expects "
                        f"{expected[path]} (as {'/'.join(path)})")
      mismatched_paths.add(path)
      continue
    converted[path] = value
  missing = ["/".join(p) for p in expected if p not in converted and p not in mismatched_paths]
  problems = []
  if missing:
    problems.append(f"missing keys (in the model, not in the file): {', '.join(sorted(missing))}")
  if unexpected:
    problems.append(f"unexpected keys (in the file, not in the model): "
                    f"{', '.join(sorted(unexpected))}")
  if mismatched:
    problems.append("wrong shapes: " + "; ".join(sorted(mismatched)))
  if problems:
    raise ConversionError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))
  return traverse_util.unflatten_dict(converted)


def to_torch(value: np.ndarray, torch_shape) -> np.ndarray:
  """A Flax parameter -> the layout of the PyTorch tensor of `torch_shape` (`to_flax`
  backwards)."""
  torch_shape = tuple(torch_shape)
  if len(torch_shape) == 4:
    if value.ndim == 2:  # a 1x1 conv in PyTorch, a Dense in Flax
      value = value[None, None]
    return value.transpose(3, 2, 0, 1)  # HWIO -> OIHW
  if len(torch_shape) == 2:
    if value.ndim == 4:  # the reverse: a linear in PyTorch, a 1x1 conv in Flax
      value = value[0, 0]
    return value.T
  return value


# -- the converted evaluation networks ------------------------------------------------------------
def _load(path: str, net: str, abstract, config_key: str, flag_hint: str):
  net_dir = checkpoint.converted_dir(
      storage.join(path, net), f"{config_key}={path}: no converted {net} weights",
      f"create them with python -m semflow_jax.convert_eval_nets {flag_hint} --output={path}")
  params_dir = storage.join(net_dir, "params")
  return checkpoint.read_params(params_dir, abstract, f"{config_key}={path}: {params_dir} does "
                               f"not match the {net} network", "the network")


def load_inception(path: str, config_key: str = "config.eval.fid_weights"):
  """Host numpy params of `inception.InceptionV3` from a directory written by `convert`."""
  return _load(path, INCEPTION, inception_lib.abstract_params(), config_key,
               "--inception=pt_inception-2015-12-05-6726825d.pth")


def load_lpips(path: str, config_key: str = "config.eval.lpips_weights"):
  """Host numpy params of `lpips.LPIPS` from a directory written by `convert`."""
  return _load(path, LPIPS, lpips_lib.abstract_params(), config_key,
               "--lpips_alex=alexnet-owt-7be5be79.pth --lpips_heads=alex.pth")
