"""Diffusers folders with random weights, built by the tests in the real on-disk layout."""

import json
import os

import numpy as np

CLIP_VOCAB = ["<|startoftext|>", "<|endoftext|>", "a</w>", "b</w>", "c</w>", "!", "a", "b"]


def randomise(module, seed: int, scale: float = 0.2):
  """Every parameter random (diffusers zero-initialises some layers, which would hide bugs)."""
  import torch
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * scale)
  return module.eval()


def save_unet(path: str, config: dict, seed: int = 0):
  from diffusers import UNet2DConditionModel
  model = randomise(UNet2DConditionModel(**config), seed)
  model.save_pretrained(path)
  return model


def save_vae(path: str, config: dict, seed: int = 1):
  from diffusers import AutoencoderKL
  model = randomise(AutoencoderKL(**config), seed)
  model.save_pretrained(path)
  return model


def save_text_encoder(root: str, width: int, tokens: int, seed: int = 2):
  """A tiny CLIP text encoder + tokenizer, as `text_encoder/` and `tokenizer/`."""
  import torch
  import transformers
  tok_dir = os.path.join(root, "tokenizer")
  os.makedirs(tok_dir, exist_ok=True)
  with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
    json.dump({t: i for i, t in enumerate(CLIP_VOCAB)}, f)
  with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n")
  tokenizer = transformers.CLIPTokenizer(os.path.join(tok_dir, "vocab.json"),
                                         os.path.join(tok_dir, "merges.txt"),
                                         model_max_length=tokens)
  tokenizer.save_pretrained(tok_dir)
  torch.manual_seed(seed)
  config = transformers.CLIPTextConfig(
      vocab_size=len(CLIP_VOCAB), hidden_size=width, intermediate_size=2 * width,
      num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=tokens,
      bos_token_id=0, eos_token_id=1, pad_token_id=1)
  encoder = transformers.CLIPTextModel(config).eval()
  encoder.save_pretrained(os.path.join(root, "text_encoder"))
  return tokenizer, encoder


def save_pipeline(root: str, unet_config: dict, vae_config: dict, tokens: int):
  """A Stable-Diffusion-shaped diffusers folder: unet/, vae/, text_encoder/, tokenizer/."""
  unet = save_unet(os.path.join(root, "unet"), unet_config)
  vae = save_vae(os.path.join(root, "vae"), vae_config)
  tokenizer, encoder = save_text_encoder(root, unet_config["cross_attention_dim"], tokens)
  with open(os.path.join(root, "model_index.json"), "w") as f:
    json.dump({"_class_name": "StableDiffusionPipeline"}, f)
  return unet, vae, tokenizer, encoder


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
  return np.asarray(x).transpose(0, 2, 3, 1)
