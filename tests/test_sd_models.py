"""The SD UNet and VAE against diffusers, and the converter's checks and outputs."""

import os

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs import sd15
from semflow_jax import checkpoint, convert, storage
from semflow_jax.models import sd_unet, sd_vae
from tests import sd_fixtures as fx

UNET_CONFIGS = {
    "sd1_like": dict(
        block_out_channels=(32, 64), layers_per_block=1, attention_head_dim=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=24,
        norm_num_groups=8),
    "sd2_like_linear_per_block_heads": dict(
        block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(2, 4, 8),
        down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2, cross_attention_dim=16,
        use_linear_projection=True, upcast_attention=True, norm_num_groups=16, norm_eps=1e-6,
        transformer_layers_per_block=2),
    "plain_first_sin_first_shifted": dict(
        block_out_channels=(16, 32), layers_per_block=(1, 2), attention_head_dim=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
        flip_sin_to_cos=False, freq_shift=1, mid_block_scale_factor=1.5, norm_num_groups=8),
    "three_cross_blocks_8_channels_out": dict(
        in_channels=3, out_channels=8, block_out_channels=(16, 32, 48), layers_per_block=1,
        attention_head_dim=(1, 2, 3), down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3, cross_attention_dim=12,
        norm_num_groups=8, downsample_padding=1),
}

VAE_CONFIGS = {
    "two_blocks": dict(block_out_channels=(16, 32), layers_per_block=1, latent_channels=4,
                       norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 2,
                       up_block_types=("UpDecoderBlock2D",) * 2),
    "three_blocks_no_quant_no_mid_attention": dict(
        block_out_channels=(8, 16, 16), layers_per_block=2, latent_channels=3,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, use_quant_conv=False,
        use_post_quant_conv=False, mid_block_add_attention=False),
}


def _relative_error(ours, reference):
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return np.abs(ours - reference).max() / np.abs(reference).max()


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_unet_matches_diffusers(tmp_path, name):
  config = UNET_CONFIGS[name]
  reference = fx.save_unet(str(tmp_path), config, seed=len(name))
  module, params = convert.load_diffusers_unet(str(tmp_path))
  gen = torch.Generator().manual_seed(0)
  c_in = config.get("in_channels", 4)
  x = torch.randn(2, c_in, 16, 24, generator=gen)  # non-square: catches H/W mix-ups
  t = torch.tensor([3.0, 917.5])
  context = torch.randn(2, 5, config["cross_attention_dim"], generator=gen)
  with torch.no_grad():
    expected = reference(x, t, context).sample.numpy()
  ours = module.apply({"params": params}, fx.nhwc(x), t.numpy(), context.numpy())
  assert ours.shape == fx.nhwc(expected).shape  # pyright: ignore[reportAttributeAccessIssue]
  assert _relative_error(fx.nchw(ours), expected) < 1e-4


@pytest.mark.parametrize("name", sorted(VAE_CONFIGS))
def test_vae_matches_diffusers(tmp_path, name):
  reference = fx.save_vae(str(tmp_path), VAE_CONFIGS[name], seed=len(name))
  module, params = convert.load_diffusers_vae(str(tmp_path))
  images = torch.rand(2, 3, 16, 24, generator=torch.Generator().manual_seed(0)) * 2 - 1
  with torch.no_grad():
    posterior = reference.encode(images).latent_dist  # pyright: ignore[reportAttributeAccessIssue]
    decoded = reference.decode(posterior.mean).sample.numpy()  # pyright: ignore[reportAttributeAccessIssue]
  mean, logvar = module.apply({"params": params}, fx.nhwc(images), method="encode")
  ours_decoded = module.apply({"params": params}, fx.nhwc(posterior.mean), method="decode")
  assert _relative_error(fx.nchw(mean), posterior.mean.numpy()) < 1e-4
  assert _relative_error(fx.nchw(logvar), posterior.logvar.numpy()) < 1e-4
  assert _relative_error(fx.nchw(ours_decoded), decoded) < 1e-4


def test_sd15_parameter_counts_match_diffusers_without_allocating():
  unet = sd_unet.SDUNet(sd_unet.SDUNetConfig.from_diffusers(sd15.UNET))
  vae = sd_vae.AutoencoderKL(sd_vae.SDVAEConfig.from_diffusers(sd15.VAE))
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  ours_unet = count(convert.unet_abstract_params(unet))
  ours_vae = count(convert.vae_abstract_params(vae))
  with torch.device("meta"):  # diffusers' own modules, shapes only
    ref_unet = sum(p.numel() for p in diffusers.UNet2DConditionModel(**sd15.UNET).parameters())
    ref_vae = sum(p.numel() for p in diffusers.AutoencoderKL(**sd15.VAE).parameters())
  assert ours_unet == ref_unet == 859_520_964
  assert ours_vae == ref_vae == 83_653_863


def test_unsupported_unet_options_are_refused_by_name():
  with pytest.raises(ValueError, match="class_embed_type"):
    sd_unet.SDUNetConfig.from_diffusers(dict(sd15.UNET, class_embed_type="timestep"))
  with pytest.raises(ValueError, match="down_block_types"):
    sd_unet.SDUNetConfig.from_diffusers(
        dict(sd15.UNET, down_block_types=("AttnDownBlock2D",) * 4))
  with pytest.raises(ValueError, match="latents_mean"):
    sd_vae.SDVAEConfig.from_diffusers(dict(sd15.VAE, latents_mean=[0.0] * 4))


def _weights_file(folder):
  return os.path.join(folder, "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("damage", ["missing", "extra", "wrong_shape"])
def test_converter_names_the_bad_key_and_writes_nothing(tmp_path, damage):
  from safetensors.numpy import load_file, save_file
  root = str(tmp_path / "sd")
  fx.save_pipeline(root, sd15.TINY_UNET, sd15.TINY_VAE, sd15.TINY_CONTEXT_TOKENS)
  weights = load_file(_weights_file(os.path.join(root, "unet")))
  key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
  if damage == "missing":
    del weights[key]
  elif damage == "extra":
    key = "down_blocks.0.resnets.0.extra_layer.weight"
    weights[key] = np.zeros((3, 3), np.float32)
  else:
    weights[key] = np.zeros((5, 5), np.float32)
  save_file(weights, _weights_file(os.path.join(root, "unet")))
  output = tmp_path / "out"
  expected_name = ("down_blocks_0/attentions_0/transformer_blocks_0/attn2/to_k/kernel"
                   if damage == "missing" else key)
  with pytest.raises(convert.ConversionError, match=expected_name):
    convert.convert(str(output), diffusers_dir=root)
  assert not output.exists()
  assert sorted(os.listdir(tmp_path)) == ["sd"]  # no staging directory left behind


def test_converted_checkpoint_holds_unet_vae_and_empty_prompt_embedding(tmp_path, monkeypatch):
  root = str(tmp_path / "sd")
  _, _, tokenizer, encoder = fx.save_pipeline(root, sd15.TINY_UNET, sd15.TINY_VAE,
                                              sd15.TINY_CONTEXT_TOKENS)
  output = convert.convert(str(tmp_path / "converted"), diffusers_dir=root)
  config = sd15.get_config("tiny")
  from semflow_jax.semflow import SemFlow
  model = SemFlow.from_config(config)
  loaded = convert.load_converted(output, jax.eval_shape(model.init, jax.random.PRNGKey(0)))
  _, unet_params = convert.load_diffusers_unet(os.path.join(root, "unet"))
  _, vae_params = convert.load_diffusers_vae(os.path.join(root, "vae"))
  for ours, ref in ((loaded["unet"], unet_params), (loaded["vae"], vae_params)):
    jax.tree.map(np.testing.assert_array_equal, ours, ref)
  # The empty prompt as SD pipelines encode it: BOS, EOS, padding to model_max_length.
  ids = tokenizer([""], padding="max_length", max_length=sd15.TINY_CONTEXT_TOKENS,
                  return_tensors="pt").input_ids
  assert ids[0, 0] == 0 and ids[0, 1] == 1
  with torch.no_grad():
    expected = encoder(ids)[0].numpy()
  np.testing.assert_allclose(loaded["context"], expected, rtol=1e-6, atol=1e-6)
  # A config whose model shape differs is refused, naming the parameter.
  config.model.unet_config.block_out_channels = (16, 48)
  other = SemFlow.from_config(config)
  with pytest.raises(convert.ConversionError, match="unet/down_blocks_1/resnets_0/conv1/kernel: stored"):
    convert.load_converted(output, jax.eval_shape(other.init, jax.random.PRNGKey(0)))
  abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0))

  # --overwrite that fails on the way (here as it commits) leaves the previous conversion
  # complete and in use, and nothing of its own behind.
  before = sorted(os.listdir(output))
  write_json = storage.write_json

  def failing_write_json(path, content):
    if str(path).endswith(checkpoint.CONVERTED_MARKER):
      raise OSError("injected: disk full")
    write_json(path, content)

  monkeypatch.setattr(storage, "write_json", failing_write_json)
  with pytest.raises(OSError, match="disk full"):
    convert.convert(output, diffusers_dir=root, overwrite=True)
  monkeypatch.undo()
  assert sorted(os.listdir(output)) == before
  jax.tree.map(np.testing.assert_array_equal, convert.load_converted(output, abstract), loaded)
  # One that succeeds replaces it, old version gone; without the marker the loader refuses.
  convert.convert(output, diffusers_dir=root, overwrite=True)
  after = sorted(os.listdir(output))
  assert len(after) == 2 and after != before and checkpoint.CONVERTED_MARKER in after
  jax.tree.map(np.testing.assert_array_equal, convert.load_converted(output, abstract), loaded)
  os.remove(os.path.join(output, checkpoint.CONVERTED_MARKER))
  with pytest.raises(FileNotFoundError, match="incomplete conversion"):
    convert.load_converted(output, abstract)


def test_bare_unet_state_dict_with_prefixes_and_npy_text_embedding(tmp_path):
  unet_dir = str(tmp_path / "unet")
  reference = fx.save_unet(unet_dir, sd15.TINY_UNET)
  # The released SemFlow UNet: a plain torch state dict, here with a DDP prefix and wrapper.
  state = {f"module.{k}": v for k, v in reference.state_dict().items()}
  torch.save({"state_dict": state}, str(tmp_path / "semflow_unet.bin"))
  embedding = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
  np.save(str(tmp_path / "empty.npy"), embedding)
  output = convert.convert(str(tmp_path / "converted"), unet_weights=str(tmp_path / "semflow_unet.bin"),
                           unet_config=os.path.join(unet_dir, "config.json"),
                           text_embedding=str(tmp_path / "empty.npy"))
  module, params = convert.load_diffusers_unet(unet_dir)
  abstract = {"unet": convert.unet_abstract_params(module),
              "context": jax.ShapeDtypeStruct((1, 8, 16), jnp.float32)}
  loaded = convert.load_converted(output, abstract)
  jax.tree.map(np.testing.assert_array_equal, loaded["unet"], params)
  np.testing.assert_array_equal(loaded["context"][0], embedding)
  # A model that needs the VAE cannot start from a UNet-only conversion.
  with pytest.raises(convert.ConversionError, match="vae"):
    convert.load_converted(output, dict(abstract, vae={}))


def test_remat_and_bfloat16_keep_the_function(tmp_path):
  config = sd_unet.SDUNetConfig.from_diffusers(UNET_CONFIGS["sd1_like"])
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 8, 8, 4)), jnp.float32)
  t = jnp.array([10.0, 600.0])
  context = jnp.asarray(rng.normal(size=(2, 3, 24)), jnp.float32)
  plain = sd_unet.SDUNet(config)
  params = jax.jit(plain.init)(jax.random.PRNGKey(0), x, t, context)["params"]

  def grads(module):  # jitted, as the train step runs it (op by op it compiles every op)
    loss = lambda p: jnp.sum(module.apply({"params": p}, x, t, context) ** 2)
    return jax.jit(jax.grad(loss))(params)

  for remat in (True, "dots"):  # whole blocks; all but the projection matmuls' outputs
    for g, g_remat in zip(jax.tree.leaves(grads(plain)),
                          jax.tree.leaves(grads(sd_unet.SDUNet(config, remat=remat)))):
      assert _relative_error(g_remat, g) < 1e-5  # same math; XLA may fuse in another order
  bf16 = sd_unet.SDUNet(config, dtype=jnp.bfloat16)
  assert jax.tree.leaves(jax.eval_shape(bf16.init, jax.random.PRNGKey(0), x, t, context))[0] \
      .dtype == jnp.float32  # master weights stay float32
  out32 = jax.jit(plain.apply)({"params": params}, x, t, context)
  out16 = jax.jit(bf16.apply)({"params": params}, x, t, context)
  assert out16.dtype == jnp.float32
  assert 0 < _relative_error(out16, out32) < 3e-2  # really computed in bf16, and close


def test_convert_command_line_reports_bad_input_in_one_line(tmp_path):
  import subprocess
  import sys

  from tests.conftest import REPO
  missing = str(tmp_path / "no_such_folder")
  out = subprocess.run([sys.executable, "-m", "semflow_jax.convert", f"--diffusers_dir={missing}",
                        f"--output={tmp_path / 'out'}"], cwd=REPO, capture_output=True, text=True)
  assert out.returncode == 2
  assert f"error: --diffusers_dir={missing}: no such directory" in out.stderr
  assert not (tmp_path / "out").exists()
