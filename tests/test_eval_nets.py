"""The FID InceptionV3 and LPIPS networks against independent PyTorch forwards, and their converter.

The references below are written with torch.nn.functional from the published architectures
(pytorch-fid's FID InceptionV3 with its FIDInceptionA/C/E patches; torchvision's AlexNet
`features` and the lpips package's LPIPS v0.1), not from semflow_jax. torchvision cannot be
imported here, so the reference builds the weights itself: the Inception state dict is created
by the reference forward as it meets each layer (so its keys and shapes come from the
architecture as written, in pytorch-fid's layout), the AlexNet trunk is random in torchvision's
layout, and the LPIPS heads are the real v0.1 weights shipped in the lpips package.
"""

import importlib.metadata
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from jax.sharding import Mesh

from semflow_jax import convert_eval_nets, parallel, perceptual
from semflow_jax.checkpoint import ConversionError
from semflow_jax.models import inception, lpips
from semflow_jax.weights import load_inception, load_lpips, read_state_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _relative_error(ours, reference):
  ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
  return np.abs(ours - reference).max() / np.abs(reference).max()


def _pair(v):
  return (v, v) if isinstance(v, int) else tuple(v)


def _mesh(n):
  return Mesh(np.asarray(jax.devices()[:n]).reshape(n, 1), ("data", "fsdp"))


# -- pytorch-fid's FID InceptionV3, independently --------------------------------------------------
class TorchFidInception:
  """pytorch-fid's `InceptionV3(output_blocks=[3])` forward over a state dict, in torch.

  With `state_dict=None` it creates the weights on the way: sparse He-normal convolutions (10%
  of the weights, scattered, nonzero), BatchNorm running statistics near the batch's own so
  activations stay well scaled. Sparse, because float32 rounding in 94 layers of dense random
  convolutions with fan-ins up to 4032 already moves the features by ~1e-4 between PyTorch's
  own float32 and float64 forwards; the float64 test below checks the dense arithmetic exactly.
  """

  def __init__(self, state_dict=None, seed=0, density=0.1):
    self.create = state_dict is None
    self.sd = {} if state_dict is None else state_dict
    self.gen = torch.Generator().manual_seed(seed)
    self.density = density

  def _rand(self, *shape):
    return torch.randn(*shape, generator=self.gen)

  def basic(self, name, x, out, kernel, stride=1, padding=0):  # torchvision BasicConv2d
    if self.create:
      kh, kw = _pair(kernel)
      fan_in = x.shape[1] * kh * kw
      keep = (torch.rand(out, x.shape[1], kh, kw, generator=self.gen) < self.density).float()
      self.sd[f"{name}.conv.weight"] = self._rand(out, x.shape[1], kh, kw) * keep * (
          2 / fan_in / self.density) ** 0.5
    x = x.to(self.sd[f"{name}.conv.weight"].dtype)
    y = F.conv2d(x, self.sd[f"{name}.conv.weight"], stride=stride, padding=_pair(padding))
    if self.create:
      mean, var = y.mean((0, 2, 3)), y.var((0, 2, 3)) + 1e-2
      self.sd[f"{name}.bn.weight"] = 1 + 0.2 * self._rand(out)
      self.sd[f"{name}.bn.bias"] = 0.1 * self._rand(out)
      self.sd[f"{name}.bn.running_mean"] = mean + 0.1 * var.sqrt() * self._rand(out)
      self.sd[f"{name}.bn.running_var"] = var * (1 + 0.2 * torch.rand(out, generator=self.gen))
      self.sd[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    y = F.batch_norm(y, self.sd[f"{name}.bn.running_mean"], self.sd[f"{name}.bn.running_var"],
                     self.sd[f"{name}.bn.weight"], self.sd[f"{name}.bn.bias"], training=False,
                     eps=0.001)
    return F.relu(y)

  def fid_a(self, n, x, pool_features):  # FIDInceptionA
    b1 = self.basic(f"{n}.branch1x1", x, 64, 1)
    b5 = self.basic(f"{n}.branch5x5_1", x, 48, 1)
    b5 = self.basic(f"{n}.branch5x5_2", b5, 64, 5, padding=2)
    b3 = self.basic(f"{n}.branch3x3dbl_1", x, 64, 1)
    b3 = self.basic(f"{n}.branch3x3dbl_2", b3, 96, 3, padding=1)
    b3 = self.basic(f"{n}.branch3x3dbl_3", b3, 96, 3, padding=1)
    bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    bp = self.basic(f"{n}.branch_pool", bp, pool_features, 1)
    return torch.cat([b1, b5, b3, bp], 1)

  def b(self, n, x):  # InceptionB
    b3 = self.basic(f"{n}.branch3x3", x, 384, 3, stride=2)
    bd = self.basic(f"{n}.branch3x3dbl_1", x, 64, 1)
    bd = self.basic(f"{n}.branch3x3dbl_2", bd, 96, 3, padding=1)
    bd = self.basic(f"{n}.branch3x3dbl_3", bd, 96, 3, stride=2)
    return torch.cat([b3, bd, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

  def fid_c(self, n, x, c7):  # FIDInceptionC
    b1 = self.basic(f"{n}.branch1x1", x, 192, 1)
    b7 = self.basic(f"{n}.branch7x7_1", x, c7, 1)
    b7 = self.basic(f"{n}.branch7x7_2", b7, c7, (1, 7), padding=(0, 3))
    b7 = self.basic(f"{n}.branch7x7_3", b7, 192, (7, 1), padding=(3, 0))
    bd = self.basic(f"{n}.branch7x7dbl_1", x, c7, 1)
    bd = self.basic(f"{n}.branch7x7dbl_2", bd, c7, (7, 1), padding=(3, 0))
    bd = self.basic(f"{n}.branch7x7dbl_3", bd, c7, (1, 7), padding=(0, 3))
    bd = self.basic(f"{n}.branch7x7dbl_4", bd, c7, (7, 1), padding=(3, 0))
    bd = self.basic(f"{n}.branch7x7dbl_5", bd, 192, (1, 7), padding=(0, 3))
    bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    bp = self.basic(f"{n}.branch_pool", bp, 192, 1)
    return torch.cat([b1, b7, bd, bp], 1)

  def d(self, n, x):  # InceptionD
    b3 = self.basic(f"{n}.branch3x3_1", x, 192, 1)
    b3 = self.basic(f"{n}.branch3x3_2", b3, 320, 3, stride=2)
    b7 = self.basic(f"{n}.branch7x7x3_1", x, 192, 1)
    b7 = self.basic(f"{n}.branch7x7x3_2", b7, 192, (1, 7), padding=(0, 3))
    b7 = self.basic(f"{n}.branch7x7x3_3", b7, 192, (7, 1), padding=(3, 0))
    b7 = self.basic(f"{n}.branch7x7x3_4", b7, 192, 3, stride=2)
    return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)

  def fid_e(self, n, x, max_pool):  # FIDInceptionE_1 (avg pool) / FIDInceptionE_2 (max pool)
    b1 = self.basic(f"{n}.branch1x1", x, 320, 1)
    b3 = self.basic(f"{n}.branch3x3_1", x, 384, 1)
    b3 = torch.cat([self.basic(f"{n}.branch3x3_2a", b3, 384, (1, 3), padding=(0, 1)),
                    self.basic(f"{n}.branch3x3_2b", b3, 384, (3, 1), padding=(1, 0))], 1)
    bd = self.basic(f"{n}.branch3x3dbl_1", x, 448, 1)
    bd = self.basic(f"{n}.branch3x3dbl_2", bd, 384, 3, padding=1)
    bd = torch.cat([self.basic(f"{n}.branch3x3dbl_3a", bd, 384, (1, 3), padding=(0, 1)),
                    self.basic(f"{n}.branch3x3dbl_3b", bd, 384, (3, 1), padding=(1, 0))], 1)
    if max_pool:
      bp = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
    else:
      bp = F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)
    bp = self.basic(f"{n}.branch_pool", bp, 192, 1)
    return torch.cat([b1, b3, bd, bp], 1)

  @torch.no_grad()
  def __call__(self, images_uint8, dtype=torch.float32):
    """uint8 NHWC -> pool3 (B, 2048): pytorch-fid with resize_input and normalize_input."""
    x = torch.from_numpy(np.ascontiguousarray(images_uint8)).permute(0, 3, 1, 2).to(dtype) / 255
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    x = 2 * x - 1
    x = self.basic("Conv2d_1a_3x3", x, 32, 3, stride=2)
    x = self.basic("Conv2d_2a_3x3", x, 32, 3)
    x = self.basic("Conv2d_2b_3x3", x, 64, 3, padding=1)
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.basic("Conv2d_3b_1x1", x, 80, 1)
    x = self.basic("Conv2d_4a_3x3", x, 192, 3)
    x = F.max_pool2d(x, kernel_size=3, stride=2)
    x = self.fid_a("Mixed_5b", x, 32)
    x = self.fid_a("Mixed_5c", x, 64)
    x = self.fid_a("Mixed_5d", x, 64)
    x = self.b("Mixed_6a", x)
    x = self.fid_c("Mixed_6b", x, 128)
    x = self.fid_c("Mixed_6c", x, 160)
    x = self.fid_c("Mixed_6d", x, 160)
    x = self.fid_c("Mixed_6e", x, 192)
    x = self.d("Mixed_7a", x)
    x = self.fid_e("Mixed_7b", x, max_pool=False)
    x = self.fid_e("Mixed_7c", x, max_pool=True)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1).numpy()


@pytest.fixture(scope="module")
def fid_net(tmp_path_factory):
  """The reference network, its state dict saved as a pytorch-fid .pth, test images, and the
  reference features of those images."""
  rng = np.random.default_rng(0)
  # Smooth random images (not white noise) at a size that is upsampled in H, downsampled in W.
  coarse = rng.uniform(0, 255, size=(2, 12, 20, 3))
  images = np.clip(np.kron(coarse, np.ones((1, 20, 20, 1))) +
                   rng.normal(0, 12, size=(2, 240, 400, 3)), 0, 255).astype(np.uint8)
  builder = TorchFidInception(seed=0)
  builder(images)  # creates every weight, in the order and shapes the architecture meets them
  state_dict = dict(builder.sd)
  gen = torch.Generator().manual_seed(1)  # the classifier the .pth carries and FID does not use
  state_dict["fc.weight"] = 0.01 * torch.randn(1008, 2048, generator=gen)
  state_dict["fc.bias"] = torch.zeros(1008)
  path = str(tmp_path_factory.mktemp("fid") / "pt_inception-test.pth")
  torch.save(state_dict, path)
  reference = TorchFidInception(state_dict)
  return dict(state_dict=state_dict, path=path, images=images, reference=reference,
              features=reference(images))


@pytest.fixture(scope="module")
def fid_params(fid_net):
  return convert_eval_nets.inception_params(read_state_dict(fid_net["path"]),
                                            fid_net["path"])


@pytest.fixture(scope="module")
def fid_extractor(fid_params):
  """Sharded over all 8 fake devices (one compiled program shared by the tests below)."""
  return perceptual.InceptionFeatures(fid_params, _mesh(8))


def test_fid_inception_matches_pytorch_fid_forward(fid_net, fid_extractor):
  reference = fid_net["features"]
  assert reference.shape == (2, 2048)
  # The test means something only if the random network's features are alive and differ.
  assert (reference > 0).mean() > 0.2 and _relative_error(reference[0], reference[1]) > 0.05
  # 2 images (240x400: resized up in height, down in width) padded to 8, the padding dropped.
  features = fid_extractor(fid_net["images"])
  assert features.shape == (2, 2048) and features.dtype == np.float32
  assert _relative_error(features, reference) < 1e-4


def test_fid_inception_is_exactly_the_architecture_in_float64(fid_net):
  """float64 on both sides: any difference left is a difference in the network."""
  rng = np.random.default_rng(6)  # 299x299: the resize is the identity in both
  images = np.clip(np.kron(rng.uniform(0, 255, size=(2, 23, 23, 3)), np.ones((1, 13, 13, 1))) +
                   rng.normal(0, 12, size=(2, 299, 299, 3)), 0, 255).astype(np.uint8)
  weights = {k: v.double() if v.is_floating_point() else v
             for k, v in fid_net["state_dict"].items()}
  reference = TorchFidInception(weights)(images, dtype=torch.float64)
  params = convert_eval_nets.inception_params({k: v.numpy() for k, v in weights.items()})
  with jax.enable_x64(True):
    module = inception.InceptionV3()
    ours = jax.jit(lambda p, x: module.apply({"params": p}, inception.fid_input(
        x, dtype=jax.numpy.float64)))(params, images)
    assert ours.dtype == jax.numpy.float64
  assert _relative_error(ours, reference) < 1e-10


@pytest.mark.parametrize("size_in", [(17, 299), (512, 384), (299, 299), (1000, 47)])
def test_resize_is_pytorch_bilinear_without_antialiasing(size_in):
  x = np.random.default_rng(1).uniform(size=(2,) + size_in + (3,)).astype(np.float32)
  ours = np.asarray(inception.resize_bilinear(jax.numpy.asarray(x), (299, 299)))
  reference = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299),
                            mode="bilinear", align_corners=False).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(ours, reference, atol=2e-6)
  with pytest.raises(TypeError, match="uint8"):
    inception.fid_input(jax.numpy.asarray(x))


def test_running_statistics_equal_numpy_mean_and_covariance():
  rng = np.random.default_rng(2)
  acts = rng.gamma(2.0, 0.2, size=(37, 6)) + 3.0  # pool3-like: positive, mean well above spread
  running, other = inception.RunningStatistics(dim=6), inception.RunningStatistics(dim=6)
  for chunk in np.array_split(acts[:20], [5, 6]):
    running.update(chunk)
  other.update(acts[20:])  # e.g. another process's examples: the sums add up
  running.count, running.sum, running.outer = (running.count + other.count,
                                               running.sum + other.sum,
                                               running.outer + other.outer)
  mu, sigma = running.result()
  np.testing.assert_allclose(mu, acts.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(acts, rowvar=False), rtol=1e-9)
  assert running.count == 37
  with pytest.raises(ValueError, match="at least 2"):
    inception.RunningStatistics(dim=6).result()


def test_statistics_of_masked_batches_and_the_npz_files(fid_net, fid_extractor, tmp_path):
  images = fid_net["images"]
  more = np.ascontiguousarray(images[:, ::-1])  # two more images (flipped)
  # Per-process batches as the eval pipeline yields them: the last one padded and masked.
  batches = [{"image": images, "mask": np.ones(2, bool)},
             {"image": np.stack([more[0], more[0]]), "mask": np.array([True, False])},
             more[1:]]  # a bare uint8 batch, shorter than the others
  stops = []
  mu, sigma, count = perceptual.statistics_of(iter(batches), fid_extractor,
                                              between_batches=lambda: stops.append(1))
  assert count == 4 and len(stops) == 3  # asked before every batch

  reference = np.concatenate([fid_net["features"], fid_net["reference"](more)])
  np.testing.assert_allclose(mu, reference.astype(np.float64).mean(0), rtol=1e-4,
                             atol=1e-4 * np.abs(reference).max())
  ref_sigma = np.cov(reference.astype(np.float64), rowvar=False)
  assert _relative_error(sigma, ref_sigma) < 1e-4
  # The .npz: pytorch-fid's keys in float64, plus what was measured; read back as written.
  path = str(tmp_path / "stats" / "celeba_val.npz")
  description = {"dataset": "test", "split": "validation", "image_size": [240, 400]}
  perceptual.write_statistics(path, mu, sigma, count, description)
  with np.load(path) as f:
    assert f["mu"].dtype == np.float64 and f["sigma"].shape == (2048, 2048)
    assert int(f["num_images"]) == 4
  read_mu, read_sigma = perceptual.read_statistics(path, description)
  np.testing.assert_array_equal(read_mu, mu)
  np.testing.assert_array_equal(read_sigma, sigma)
  with pytest.raises(ValueError, match="celeba_val.npz: cached FID statistics are of"):
    perceptual.read_statistics(path, dict(description, split="train"))
  # A pytorch-fid --save-stats file (mu and sigma only) is accepted as it is.
  np.savez(str(tmp_path / "pytorch_fid.npz"), mu=mu, sigma=sigma)
  theirs, _ = perceptual.read_statistics(str(tmp_path / "pytorch_fid.npz"), description)
  np.testing.assert_array_equal(theirs, mu)
  np.save(str(tmp_path / "not_stats.npy"), mu)
  with pytest.raises(ValueError, match="not FID statistics"):
    perceptual.read_statistics(str(tmp_path / "not_stats.npy"))


# -- the converter ---------------------------------------------------------------------------------
INCEPTION_DAMAGE = {
    "missing": ("Mixed_6e.branch7x7dbl_3.bn.running_var", None,
                "missing keys.*Mixed_6e/branch7x7dbl_3/bn/running_var"),
    "extra": ("Mixed_6e.branch7x7dbl_6.conv.weight", np.zeros((192, 192, 1, 7), np.float32),
              "unexpected keys.*Mixed_6e.branch7x7dbl_6.conv.weight"),
    "mis-shaped": ("Mixed_7c.branch_pool.conv.weight", np.zeros((192, 2048, 3, 3), np.float32),
                   r"wrong shapes: Mixed_7c.branch_pool.conv.weight: \(192, 2048, 3, 3\)"),
}


@pytest.mark.parametrize("damage", sorted(INCEPTION_DAMAGE))
def test_inception_converter_refuses_missing_extra_or_misshaped_keys(fid_net, tmp_path, damage):
  key, value, message = INCEPTION_DAMAGE[damage]
  state_dict = {k: v.float().numpy() for k, v in fid_net["state_dict"].items()}
  if value is None:
    del state_dict[key]
  else:
    state_dict[key] = value
  path = str(tmp_path / "damaged.pth")
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, path)
  output = tmp_path / "out"
  with pytest.raises(ConversionError, match=message):
    convert_eval_nets.convert(str(output), inception=path)
  assert not output.exists()  # nothing written


def test_converted_inception_round_trips_and_loader_checks(fid_net, fid_params, tmp_path):
  output = convert_eval_nets.convert(str(tmp_path / "nets"), inception=fid_net["path"])
  loaded = load_inception(output)
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, fid_params))
  with pytest.raises(ConversionError, match="already exists"):
    convert_eval_nets.convert(output, inception=fid_net["path"])
  # This directory holds no LPIPS: the loader says which config key and how to make it.
  with pytest.raises(FileNotFoundError, match="config.eval.lpips_weights=.*convert_eval_nets"):
    load_lpips(output)
  missing = str(tmp_path / "no_such.pth")
  with pytest.raises(ConversionError, match=f"--inception={re.escape(missing)}: no such file"):
    convert_eval_nets.convert(str(tmp_path / "other"), inception=missing)
  assert not (tmp_path / "other").exists()


def test_lpips_loader_refuses_a_checkpoint_of_other_shapes(lpips_net, tmp_path):
  _, params = lpips_net
  tampered = jax.tree.map(np.asarray, params)
  tampered["lin3"]["model_1"]["kernel"] = np.zeros((1, 1, 128, 1), np.float32)
  convert_eval_nets._save(str(tmp_path), "lpips", tampered, {})
  with pytest.raises(ConversionError, match=r"(?s)config.eval.lpips_weights=.*lin3/model_1/"
                     r"kernel: stored \(1, 1, 128, 1\), the network expects \(1, 1, 256, 1\)"):
    load_lpips(str(tmp_path))


# -- LPIPS -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lpips_files(tmp_path_factory):
  """Random AlexNet in torchvision's layout; the real v0.1 heads from the lpips package."""
  heads = importlib.metadata.distribution("lpips").locate_file("lpips/weights/v0.1/alex.pth")
  assert os.path.exists(heads), "install the test extra (lpips, for its v0.1 head weights)"
  gen = torch.Generator().manual_seed(3)
  trunk = {}
  for index, (cin, cout, k) in {0: (3, 64, 11), 3: (64, 192, 5), 6: (192, 384, 3),
                                8: (384, 256, 3), 10: (256, 256, 3)}.items():
    trunk[f"features.{index}.weight"] = torch.randn(cout, cin, k, k, generator=gen) * (
        2 / (cin * k * k)) ** 0.5
    trunk[f"features.{index}.bias"] = 0.05 * torch.randn(cout, generator=gen)
  # torchvision's classifier keys, which LPIPS does not use (small stand-ins for 4096-wide layers).
  for index, (cin, cout) in {1: (9216, 4), 4: (4, 4), 6: (4, 1000)}.items():
    trunk[f"classifier.{index}.weight"] = torch.zeros(cout, cin)
    trunk[f"classifier.{index}.bias"] = torch.zeros(cout)
  directory = tmp_path_factory.mktemp("lpips")
  trunk_path = str(directory / "alexnet-test.pth")
  torch.save(trunk, trunk_path)
  return dict(trunk=trunk, trunk_path=trunk_path, heads_path=str(heads),
              heads=torch.load(str(heads), map_location="cpu", weights_only=True))


@torch.no_grad()
def torch_lpips(trunk, heads, x0_uint8, x1_uint8):
  """lpips.LPIPS(net='alex', version='0.1') forward, from the published code's structure."""
  shift = torch.tensor([-.030, -.088, -.188])[None, :, None, None]
  scale = torch.tensor([.458, .448, .450])[None, :, None, None]

  def alexnet_relus(u):
    x = torch.from_numpy(np.ascontiguousarray(u)).permute(0, 3, 1, 2).float() / (255 / 2) - 1
    h = (x - shift) / scale
    outs = []
    for index, stride, padding, pool in ((0, 4, 2, False), (3, 1, 2, True), (6, 1, 1, True),
                                         (8, 1, 1, False), (10, 1, 1, False)):
      if pool:
        h = F.max_pool2d(h, kernel_size=3, stride=2)
      h = F.relu(F.conv2d(h, trunk[f"features.{index}.weight"], trunk[f"features.{index}.bias"],
                          stride=stride, padding=padding))
      outs.append(h)
    return outs

  total = 0
  for layer, (f0, f1) in enumerate(zip(alexnet_relus(x0_uint8), alexnet_relus(x1_uint8))):
    n0 = f0 / (torch.sqrt(torch.sum(f0 ** 2, dim=1, keepdim=True)) + 1e-10)
    n1 = f1 / (torch.sqrt(torch.sum(f1 ** 2, dim=1, keepdim=True)) + 1e-10)
    total = total + F.conv2d((n0 - n1) ** 2, heads[f"lin{layer}.model.1.weight"]).mean([2, 3])
  return total[:, 0].numpy()


@pytest.fixture(scope="module")
def lpips_net(lpips_files):
  params = convert_eval_nets.lpips_params(
      read_state_dict(lpips_files["trunk_path"]),
      read_state_dict(lpips_files["heads_path"]))
  return perceptual.LpipsDistances(params, _mesh(4)), params


def test_lpips_matches_the_lpips_forward_with_real_heads(lpips_files, lpips_net):
  scorer, _ = lpips_net
  rng = np.random.default_rng(4)
  base = rng.integers(0, 256, size=(3, 64, 72, 3), dtype=np.uint8)
  other = np.clip(base + rng.normal(0, 40, size=base.shape), 0, 255).astype(np.uint8)
  ours = scorer.between(base, other)
  reference = torch_lpips(lpips_files["trunk"], lpips_files["heads"], base, other)
  assert ours.shape == (3,) and np.all(reference > 1e-3)
  np.testing.assert_allclose(ours, reference, rtol=1e-4)
  np.testing.assert_allclose(scorer.between(base, base), 0.0, atol=1e-7)
  # Masked (padding) examples are dropped.
  np.testing.assert_allclose(scorer.between(base, other, mask=np.array([1, 0, 1])),
                             reference[[0, 2]], rtol=1e-4)
  # On the device: batch-sharded global arrays in, batch-sharded distances out.
  batch = parallel.to_global({"a": np.concatenate([base, base[:1]]),
                              "b": np.concatenate([other, other[:1]])}, _mesh(4))
  distances = scorer.device(batch["a"], batch["b"])
  assert distances.sharding.is_equivalent_to(batch["a"].sharding, 1)
  np.testing.assert_allclose(np.asarray(distances)[:3], reference, rtol=1e-4)


LPIPS_DAMAGE = {
    "trunk missing": ("trunk", "features.10.bias", None, "missing keys.*features_10/bias"),
    "trunk extra": ("trunk", "features.12.weight", np.zeros((3, 3, 3, 3), np.float32),
                    "unexpected keys.*features.12.weight"),
    "heads mis-shaped": ("heads", "lin2.model.1.weight", np.zeros((1, 256, 1, 1), np.float32),
                         r"lin2.model.1.weight: \(1, 256, 1, 1\) in the file"),
    "heads missing": ("heads", "lin4.model.1.weight", None, "missing keys.*lin4/model_1/kernel"),
}


@pytest.mark.parametrize("damage", sorted(LPIPS_DAMAGE))
def test_lpips_converter_refuses_missing_extra_or_misshaped_keys(lpips_files, tmp_path, damage):
  which, key, value, message = LPIPS_DAMAGE[damage]
  files = {"trunk": lpips_files["trunk_path"], "heads": lpips_files["heads_path"]}
  state_dict = {k: v.numpy() for k, v in lpips_files[which].items()}
  if value is None:
    del state_dict[key]
  else:
    state_dict[key] = value
  files[which] = str(tmp_path / f"damaged_{which}.pth")
  torch.save({k: torch.from_numpy(v) for k, v in state_dict.items()}, files[which])
  output = tmp_path / "out"
  with pytest.raises(ConversionError,
                     match=f"(?s){re.escape(files[which])} does not fit the model:.*{message}"):
    convert_eval_nets.convert(str(output), lpips_alex=files["trunk"], lpips_heads=files["heads"])
  assert not output.exists()


def test_converter_cli_writes_lpips_or_exits_2_naming_the_problem(lpips_files, lpips_net, tmp_path):
  output = tmp_path / "nets"
  command = [sys.executable, "-m", "semflow_jax.convert_eval_nets",
             f"--lpips_alex={lpips_files['trunk_path']}", f"--output={output}"]
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  failed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
  assert failed.returncode == 2 and "--lpips_heads" in failed.stderr, failed.stderr[-2000:]
  assert "Traceback" not in failed.stderr and not output.exists()
  done = subprocess.run(command + [f"--lpips_heads={lpips_files['heads_path']}"], cwd=REPO,
                        capture_output=True, text=True, env=env, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  loaded = load_lpips(str(output))
  jax.tree.map(np.testing.assert_array_equal, loaded, jax.tree.map(np.asarray, lpips_net[1]))


def test_converters_import_beside_the_main_program():
  # semflow_jax.main defines --output; importing the converters' functions must not clash.
  proc = subprocess.run([sys.executable, "-c", "import semflow_jax.main, semflow_jax.convert, "
                         "semflow_jax.convert_eval_nets"], cwd=REPO, capture_output=True,
                        text=True, env={**os.environ, "XLA_FLAGS": ""}, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]


_TWO_PROCESS_WORKER = """
import json, sys
import jax
import numpy as np
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from jax.sharding import Mesh
from semflow_jax import perceptual
from tests.test_eval_nets import lpips_case
p = jax.process_index()
params, a, b, mask = lpips_case()
mesh = Mesh(np.asarray(jax.devices()).reshape(-1, 1), ("data", "fsdp"))
rows = slice(2 * p, 2 * p + 2)  # process p's slice of the split; its last example is padding
print("RESULT", json.dumps(perceptual.LpipsDistances(params, mesh).between(
    a[rows], b[rows], mask[rows]).tolist()), flush=True)
"""


def lpips_case():
  """Random LPIPS weights and 4 image pairs, the last one padding (same in every process)."""
  rng = np.random.default_rng(8)
  params = jax.tree.map(lambda s: (0.05 * rng.normal(size=s.shape)).astype(np.float32),
                        lpips.abstract_params())
  a, b = rng.integers(0, 256, size=(2, 4, 40, 40, 3), dtype=np.uint8)
  return params, a, b, np.array([True, True, True, False])


def test_two_processes_get_the_whole_global_batch(tmp_path):
  """Each process passes its own examples and gets every valid example's distance back."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{s.getsockname()[1]}"
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
         "JAX_PLATFORMS": "cpu"}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # written by process 0 only; keep the work equal
  logs = [open(tmp_path / f"process_{i}.log", "w+") for i in range(2)]  # files: no pipe stalls
  procs = [subprocess.Popen([sys.executable, "-c", _TWO_PROCESS_WORKER, address, str(i)],
                            cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    for p in procs:
      p.wait(timeout=300)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  outputs = []
  for f in logs:
    f.seek(0)
    outputs.append(f.read())
    f.close()
  params, a, b, mask = lpips_case()
  expected = perceptual.LpipsDistances(params, _mesh(4)).between(a, b, mask)
  assert expected.shape == (3,)
  for proc, out in zip(procs, outputs):
    assert proc.returncode == 0, out[-3000:]
    line = [l for l in out.splitlines() if l.startswith("RESULT ")][-1]
    np.testing.assert_allclose(json.loads(line[len("RESULT "):]), expected, rtol=1e-6)
