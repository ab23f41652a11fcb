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
out)), and every shape is checked against `jax.eval_shape` of the Linen module (semflow_jax/
weights.py). Missing, unexpected or mis-shaped keys are refused by name and nothing is written.
"""

import io
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging

from semflow_jax import checkpoint, cli, storage
from semflow_jax.checkpoint import ConversionError, load_converted  # noqa: F401 (public API)
from semflow_jax.models.sd_unet import SDUNet, SDUNetConfig
from semflow_jax.models.sd_vae import AutoencoderKL, SDVAEConfig
from semflow_jax.weights import convert_state_dict, read_config, read_state_dict, weight_files


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
  """Defined only when run as a program: tests import this module for its functions inside
  programs that define `--output` themselves."""
  flags.DEFINE_string("diffusers_dir", None, "Stable Diffusion folder in the diffusers layout.")
  flags.DEFINE_string("unet_weights", None, "UNet state dict (.safetensors/.bin) to use instead of "
                      "diffusers_dir/unet (e.g. the released SemFlow UNet).")
  flags.DEFINE_string("unet_config", None, "UNet config.json (or its folder) for --unet_weights "
                      "without --diffusers_dir.")
  flags.DEFINE_string("text_embedding", None, "Empty-prompt embedding .npy instead of computing it "
                      "with diffusers_dir/text_encoder.")
  cli.define_output_flags("Directory to write; config.model.init_from points here.",
                          "Replace an existing output directory.")


def main(argv):
  del argv
  cli.run_converter(convert, ("diffusers_dir", "unet_weights", "unet_config", "text_embedding"))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
