"""The fused attention kernels against the einsum reference (itself checked against diffusers in
test_sd_models), on the shapes of every SD-1.5 attention layer; the per-layer choice; and the
Pallas TPU kernels compiled for a TPU topology by libtpu on this CPU."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import sd15
from semflow_jax.models import sd_layers as L
from semflow_jax.semflow import SemFlow


@functools.lru_cache(maxsize=None)
def sd15_attention_layers(mesh=None):
  """Every distinct attention layer SD-1.5 SemFlow runs at 512x512 (UNet and VAE), as traced."""
  config = sd15.get_config()
  config.data.image_size = 512
  model = SemFlow.from_config(config, mesh)
  params = jax.eval_shape(model.init, jax.random.PRNGKey(0))
  batch = 1 if mesh is None else mesh.devices.size
  images = jax.ShapeDtypeStruct((batch, 512, 512, 3), jnp.uint8)
  with L.record_attention() as calls:
    jax.eval_shape(lambda p, x: model.decode(p, model.velocity(p, model.encode_image(p, x), 0.5)),
                   params, images)
  return sorted({tuple(sorted(c.items())) for c in calls})


def _qkv(batch, q_len, kv_len, heads, dim_head, seed=0):
  kq, kk, kv = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(kq, (batch, q_len, heads, dim_head)),
          jax.random.normal(kk, (batch, kv_len, heads, dim_head)),
          jax.random.normal(kv, (batch, kv_len, heads, dim_head)))


def test_sd15_has_the_expected_attention_layers():
  layers = [dict(c) for c in sd15_attention_layers()]
  shapes = {(c["q_len"], c["kv_len"], c["heads"], c["dim_head"]) for c in layers}
  # Self- and cross-attention (77 text tokens) at 64^2, 32^2, 16^2 and 8^2 latents with head
  # dims 40/80/160, and the VAE's single-head mid-block attention over 64^2 positions.
  assert shapes == {(4096, 4096, 8, 40), (4096, 77, 8, 40), (1024, 1024, 8, 80),
                    (1024, 77, 8, 80), (256, 256, 8, 160), (256, 77, 8, 160), (64, 64, 8, 160),
                    (64, 77, 8, 160), (4096, 4096, 1, 512)}
  assert {c["kernel"] for c in layers} == {"einsum"}  # auto on a CPU


@pytest.mark.parametrize("layer", range(9))
def test_dot_product_attention_equals_einsum_on_every_sd15_layer(layer):
  c = dict(sd15_attention_layers()[layer])
  q, k, v = _qkv(1, c["q_len"], c["kv_len"], c["heads"], c["dim_head"], seed=layer)
  fused = jax.jit(functools.partial(L.dot_product_attention, platform="cpu"))(q, k, v)
  reference = jax.jit(L.einsum_attention)(q, k, v)
  np.testing.assert_allclose(fused, reference, atol=1e-5, rtol=1e-5)


def test_splash_kernel_equals_einsum_in_interpret_mode():
  """Our wrapper (layout, scaling, blocks) around the Pallas kernel, run by Pallas' interpreter."""
  q, k, v = _qkv(2, 256, 384, 2, 40)
  np.testing.assert_allclose(L.splash_attention(q, k, v, interpret=True),
                             L.einsum_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_kernel_choice_per_layer():
  tpu, gpu, cpu = (L.AttentionImpl("auto", p) for p in ("tpu", "gpu", "cpu"))
  assert tpu.kernel(8, 4096, 4096) == "splash"
  assert tpu.kernel(8, 4096, 77) == "dot_product"       # 77 keys do not fill kernel blocks
  assert tpu.kernel(8, 256, 256) == "dot_product"       # short: XLA's fused softmax
  assert gpu.kernel(8, 4096, 4096) == "dot_product"
  assert cpu.kernel(8, 4096, 4096) == "einsum"          # the fastest on XLA:CPU (RESULTS.md)
  assert L.AttentionImpl("splash", "tpu").kernel(8, 256, 256) == "splash"
  assert L.AttentionImpl("splash", "tpu").kernel(8, 64, 77) == "dot_product"
  assert L.AttentionImpl("dot_product", "tpu").kernel(8, 4096, 4096) == "dot_product"


def test_bad_attention_settings_are_refused_by_key():
  config = sd15.get_config("tiny")
  config.model.attention = "flash3"
  with pytest.raises(ValueError, match="config.model.attention='flash3'"):
    SemFlow.from_config(config)
  config.model.attention = "splash"
  with pytest.raises(ValueError, match="TPU kernel"):
    SemFlow.from_config(config)


def test_splash_kernels_compile_for_tpu_on_sd15_layers():
  """libtpu compiles the Pallas kernels (forward and backward, per chip under shard_map) for a
  v5e 2x2 slice, for SD-1.5's layers that `auto` sends to splash."""
  from jax.experimental import topologies
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2").devices
  mesh = Mesh(np.asarray(devices).reshape(4, 1), ("data", "fsdp"))
  splash_layers = [dict(c) for c in sd15_attention_layers(mesh) if dict(c)["kernel"] == "splash"]
  assert {(c["q_len"], c["heads"], c["dim_head"]) for c in splash_layers} == {
      (4096, 8, 40), (1024, 8, 80), (4096, 1, 512)}
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  for c in splash_layers:
    shape = lambda n: jax.ShapeDtypeStruct((4, n, c["heads"], c["dim_head"]), jnp.bfloat16,  # noqa: B023  (called within the iteration)
                                           sharding=sharding)
    loss = lambda q, k, v: L.splash_attention(q, k, v, mesh).astype(jnp.float32).sum()
    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = grads.lower(shape(c["q_len"]), shape(c["kv_len"]), shape(c["kv_len"])).compile()
    memory = compiled.memory_analysis()
    assert memory.argument_size_in_bytes > 0
    # The kernel never materialises the (q_len x kv_len) logits of a chip's example.
    assert memory.temp_size_in_bytes < c["heads"] * c["q_len"] * c["kv_len"] * 4

