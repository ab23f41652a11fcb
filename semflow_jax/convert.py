"""PyTorch (diffusers) weights -> semflow_jax Flax parameters, and the converted checkpoint.

Convert a Stable Diffusion folder in the diffusers layout (`unet/`, `vae/`, `text_encoder/`,
`tokenizer/`, each with `config.json` and `*.safetensors` or `*.bin`):

  python -m semflow_jax.convert --diffusers_dir=/data/stable-diffusion-v1-5 --output=/data/sd15_flax

Start from the released SemFlow UNet instead (a bare diffusers-format UNet state dict):

  python -m semflow_jax.convert --diffusers_dir=/data/stable-diffusion-v1-5 \\
      --unet_weights=/data/semflow_unet.bin --output=/data/semflow_flax

or convert only that UNet, given its config: `--unet_weights=... --unet_config=unet/config.json`.
The output directory holds one complete version, `conversion-<time>-<id>/` with `params/` (an
Orbax checkpoint of {'unet', 'vae', 'context'}), `unet_config.json` and `vae_config.json`, and
`conversion.json`, written last, naming it (checkpoint.save_converted: with --overwrite the old
version stays in use until the new one is complete); `config.model.init_from` points at it.
From gs:// only the files converted are fetched. 'context' is the empty-prompt CLIP embedding
that SemFlow feeds to cross-attention.

Keys are renamed mechanically (`down_blocks.0.resnets.1.conv1.weight` ->
`down_blocks_0/resnets_1/conv1/kernel`), kernels transposed (OIHW -> HWIO, (out, in) -> (in,
out)), and every shape is checked against `jax.eval_shape` of the Linen module. Missing,
unexpected or mis-shaped keys are refused by name and nothing is written.
"""

import io
import json
import re
import sys
from typing import Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import traverse_util

from semflow_jax import checkpoint, storage
from semflow_jax.checkpoint import ConversionError, load_converted  # noqa: F401 (public API)
from semflow_jax.models.sd_unet import SDUNet, SDUNetConfig
from semflow_jax.models.sd_vae import AutoencoderKL, SDVAEConfig


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
def _flax_path(torch_key: str, expected) -> Tuple[str, ...]:
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


def _to_flax(array: np.ndarray, expected_shape) -> np.ndarray:
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
    path = _flax_path(torch_key, expected)
    if path not in expected:
      unexpected.append(torch_key)
      continue
    value = _to_flax(array, expected[path])
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


# -- public API ------------------------------------------------------------------------------------
def unet_abstract_params(module: SDUNet, latent_size: int = 8):
  cfg = module.config
  x = jax.ShapeDtypeStruct((1, latent_size, latent_size, cfg.in_channels), jnp.float32)
  context = jax.ShapeDtypeStruct((1, 1, cfg.cross_attention_dim), jnp.float32)
  t = jax.ShapeDtypeStruct((1,), jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x, t, context)["params"]


def vae_abstract_params(module: AutoencoderKL):
  f = 2 ** (len(module.config.block_out_channels) - 1)
  x = jax.ShapeDtypeStruct((1, 2 * f, 2 * f, module.config.in_channels), jnp.float32)
  return jax.eval_shape(module.init, jax.random.PRNGKey(0), x)["params"]


def load_diffusers_unet(path: str, weights: Optional[str] = None, dtype=jnp.float32,
                        remat: bool = False):
  """(SDUNet module, params) from a diffusers UNet folder (config.json + weights), local or
  gs:// (only config.json and the weights read are fetched).

  `weights` overrides the weights file (e.g. a released fine-tuned UNet state dict).
  `module.apply({"params": params}, x_nhwc, timesteps, context)` is the UNet in NHWC.
  """
  config = SDUNetConfig.from_diffusers(read_config(path), source=f"{path}/config.json")
  module = SDUNet(config, dtype=dtype, remat=remat)
  source = weights or path
  params = convert_state_dict(read_state_dict(source), unet_abstract_params(module), source)
  return module, params


def load_diffusers_vae(path: str, dtype=jnp.float32):
  """(AutoencoderKL module, params) from a diffusers VAE folder; methods `encode`, `decode`."""
  config = SDVAEConfig.from_diffusers(read_config(path), source=f"{path}/config.json")
  module = AutoencoderKL(config, dtype=dtype)
  params = convert_state_dict(read_state_dict(path), vae_abstract_params(module), path)
  return module, params


# What transformers reads from a tokenizer folder (the rest of a diffusers clone is not fetched).
_TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "tokenizer.json")


def empty_prompt_embedding(diffusers_dir: str) -> np.ndarray:
  """CLIP text-encoder output for the empty prompt, (1, max_length, D), as SD pipelines pad it."""
  try:
    import torch
    import transformers
  except ImportError as e:
    raise ConversionError("computing the empty-prompt embedding needs torch and transformers "
                          "(pip install 'semflow_jax[convert]'), or pass --text_embedding=FILE.npy"
                          ) from e
  folders = {sub: storage.join(diffusers_dir, sub) for sub in ("tokenizer", "text_encoder")}
  for sub, folder in folders.items():
    if not storage.is_dir(folder):
      raise ConversionError(f"{diffusers_dir}/{sub}: missing (needed for the empty-prompt "
                            "embedding; or pass --text_embedding=FILE.npy)")
  tokenizer_files = [f for f in storage.listdir(folders["tokenizer"]) if f in _TOKENIZER_FILES]
  encoder_files = ["config.json", *weight_files(folders["text_encoder"])]
  with storage.local_copy(folders["tokenizer"], tokenizer_files) as tokenizer_dir, \
       storage.local_copy(folders["text_encoder"], encoder_files) as encoder_dir:
    tokenizer = transformers.CLIPTokenizer.from_pretrained(tokenizer_dir)
    encoder = transformers.CLIPTextModel.from_pretrained(encoder_dir)
  ids = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length,
                  truncation=True, return_tensors="pt").input_ids
  with torch.no_grad():
    return encoder(ids)[0].float().numpy()


def _read_embedding(path: str, width: int) -> np.ndarray:
  try:
    emb = np.load(io.BytesIO(storage.read_bytes(path)))
  except Exception as e:
    raise ConversionError(f"{path}: not a readable .npy file ({e})") from e
  emb = emb[None] if emb.ndim == 2 else emb
  if emb.ndim != 3 or emb.shape[0] != 1 or emb.shape[-1] != width:
    raise ConversionError(f"{path}: text embedding has shape {emb.shape}; expected "
                          f"(1, tokens, {width}) or (tokens, {width}) for the UNet's "
                          f"cross_attention_dim {width}")
  return emb.astype(np.float32)


def convert(output: str, diffusers_dir: Optional[str] = None, unet_weights: Optional[str] = None,
            unet_config: Optional[str] = None, text_embedding: Optional[str] = None,
            overwrite: bool = False) -> str:
  """Write a converted checkpoint directory at `output` (local or gs://); returns its path.

  Every input is read and checked before anything is written. The parameters and configs go to
  a new version directory inside `output`, and `conversion.json`, written last, makes it the
  one readers use (checkpoint.save_converted): with --overwrite the previous conversion stays
  complete and in use until then, and a failure on the way leaves it so.
  """
  output = storage.resolve(output)
  if storage.exists(output) and not overwrite:
    raise ConversionError(f"{output} already exists (pass --overwrite to replace it)")
  if diffusers_dir is None and unet_weights is None:
    raise ConversionError("give --diffusers_dir, or --unet_weights with --unet_config")
  if diffusers_dir is None and unet_config is None:
    raise ConversionError("--unet_weights without --diffusers_dir needs --unet_config")
  if diffusers_dir is not None and not storage.is_dir(diffusers_dir):
    raise ConversionError(f"--diffusers_dir={diffusers_dir}: no such directory")

  unet_dir = unet_config or storage.join(diffusers_dir, "unet")
  logging.info("converting the UNet from %s", unet_weights or unet_dir)
  unet, unet_params = load_diffusers_unet(unet_dir, weights=unet_weights)
  params = {"unet": unet_params}
  configs = {"unet_config.json": unet.config.to_diffusers()}
  if diffusers_dir is not None:
    logging.info("converting the VAE from %s/vae", diffusers_dir)
    vae, params["vae"] = load_diffusers_vae(storage.join(diffusers_dir, "vae"))
    configs["vae_config.json"] = vae.config.to_diffusers()
  width = unet.config.cross_attention_dim
  if text_embedding is not None:
    params["context"] = _read_embedding(text_embedding, width)
  elif diffusers_dir is not None:
    logging.info("computing the empty-prompt embedding with %s/text_encoder", diffusers_dir)
    params["context"] = empty_prompt_embedding(diffusers_dir)
    if params["context"].shape[-1] != width:
      raise ConversionError(f"{diffusers_dir}/text_encoder: embedding width "
                            f"{params['context'].shape[-1]} != the UNet's cross_attention_dim "
                            f"{width}")

  # A new version beside the old one; the marker written last switches readers over to it.
  checkpoint.save_converted(output, params, configs,
                            {"diffusers_dir": diffusers_dir, "unet_weights": unet_weights,
                             "unet_config": unet_config, "text_embedding": text_embedding,
                             "items": sorted(params)})
  logging.info("wrote %s (%s)", output, ", ".join(sorted(params)))
  return output


# -- command line ----------------------------------------------------------------------------------
def _define_flags():
  """Defined only when run as a program: modules that import this one for its functions (state,
  convert_eval_nets) run inside programs that define `--output` themselves (semflow_jax.main)."""
  flags.DEFINE_string("diffusers_dir", None, "Stable Diffusion folder in the diffusers layout.")
  flags.DEFINE_string("unet_weights", None, "UNet state dict (.safetensors/.bin) to use instead of "
                      "diffusers_dir/unet (e.g. the released SemFlow UNet).")
  flags.DEFINE_string("unet_config", None, "UNet config.json (or its folder) for --unet_weights "
                      "without --diffusers_dir.")
  flags.DEFINE_string("text_embedding", None, "Empty-prompt embedding .npy instead of computing it "
                      "with diffusers_dir/text_encoder.")
  flags.DEFINE_string("output", None, "Directory to write; config.model.init_from points here.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing output directory.")


def main(argv):
  del argv
  f = flags.FLAGS
  if not f.output:
    raise app.UsageError("--output is required")
  try:
    # A bucket that cannot be used is reported now, not after minutes of converting.
    storage.check(f.output, "--output", write=True)
    for name in ("diffusers_dir", "unet_weights", "unet_config", "text_embedding"):
      storage.check(getattr(f, name), f"--{name}")
    convert(f.output, f.diffusers_dir, f.unet_weights, f.unet_config, f.text_embedding,
            f.overwrite)
  except (ConversionError, FileNotFoundError, storage.StorageError) as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    raise SystemExit(2) from None


if __name__ == "__main__":
  _define_flags()
  app.run(main)
