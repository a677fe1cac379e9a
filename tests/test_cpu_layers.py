"""The CPU backend's layers equal the plain ones: the hand-written convolution and
BatchNorm gradients, the native kernels in a ResNet, the same variables, and the
backend choice ('auto' on one device and on several)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from adaptive_vision import backend, cpu, models
from adaptive_vision.cpu import conv as conv_lib
from adaptive_vision.cpu import norm as norm_lib
from adaptive_vision.models import layers as plain
from adaptive_vision.models import resnet as resnet_lib

_PAD1 = ((1, 1), (1, 1))
_PAD0 = ((0, 0), (0, 0))


def _layers(**choices):
  return cpu.layers(dict(dict(conv="xla", norm="autodiff", exit_head="xla", decide="xla",
                              attention="fused"), **choices))


# -- the convolution ----------------------------------------------------------

@pytest.mark.parametrize("kernel,stride,padding,size,cin,cout,batch", [
    (3, 1, _PAD1, 8, 5, 7, 3),     # the ResNet 3x3 convolutions
    (3, 2, _PAD1, 8, 5, 7, 3),     # first convolution of a stage
    (3, 2, _PAD1, 7, 3, 4, 2),     # odd size
    (1, 2, _PAD0, 8, 5, 7, 3),     # option-B projection shortcut
    (1, 1, _PAD0, 6, 4, 6, 2),     # 1x1, stride 1
    (4, 4, _PAD0, 16, 3, 8, 2),    # a ViT patch embedding
    (3, 1, ((0, 2), (1, 0)), 6, 2, 3, 5),  # asymmetric padding
])
def test_gemm_gradients_equal_xla(kernel, stride, padding, size, cin, cout, batch):
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(kernel * 10 + stride), 3)
  x = jax.random.normal(kx, (batch, size, size, cin))
  w = jax.random.normal(kw, (kernel, kernel, cin, cout))
  strides = (stride, stride)
  ref = conv_lib._xla_conv(x, w, strides, padding)
  probe = jax.random.normal(kc, ref.shape)

  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w, strides, padding) * probe)

  np.testing.assert_allclose(conv_lib.conv2d(x, w, strides, padding), ref, rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(loss(conv_lib.conv2d), (0, 1)))(x, w)
  want = jax.jit(jax.grad(loss(conv_lib._xla_conv), (0, 1)))(x, w)
  for g, r in zip(got, want):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5 * float(jnp.abs(r).max()))


def test_batch_chunks_divide_the_batch_and_fit():
  assert conv_lib._batch_chunk(128, 1024 * 144 * 4) == 2  # 590 KB per image, 2 MiB chunks
  assert conv_lib._batch_chunk(7, 1) == 7
  assert conv_lib._batch_chunk(6, 10 << 20) == 1  # one image over the budget: 1
  for b, per in [(128, 300_000), (96, 50_000), (10, 700_000)]:
    c = conv_lib._batch_chunk(b, per)
    assert b % c == 0 and (c == 1 or c * per <= conv_lib._CHUNK_BYTES)


@pytest.mark.parametrize("cls", [conv_lib.GemmConv,
                                 pytest.param(conv_lib.NativeConv,
                                              marks=pytest.mark.requires("native"))])
def test_cpu_convs_are_nn_conv_in_variables_and_values(cls):
  x = jax.random.normal(jax.random.PRNGKey(5), (2, 8, 8, 16))
  for kw in (dict(strides=2, padding=_PAD1, use_bias=True), dict(padding="SAME"),
             dict(strides=2, padding="VALID")):
    ours, theirs = cls(16, (3, 3), **kw), nn.Conv(16, (3, 3), **kw)
    p_ours = ours.init(jax.random.PRNGKey(0), x)
    p_theirs = theirs.init(jax.random.PRNGKey(0), x)
    assert (jax.tree_util.tree_map(jnp.shape, p_ours)
            == jax.tree_util.tree_map(jnp.shape, p_theirs))
    np.testing.assert_allclose(p_ours["params"]["kernel"], p_theirs["params"]["kernel"])
    np.testing.assert_allclose(jax.jit(ours.apply)(p_theirs, x), theirs.apply(p_theirs, x),
                               rtol=1e-5, atol=1e-4)


# -- BatchNorm ------------------------------------------------------------------

def _autodiff_train(x, scale, bias, epsilon):
  """The same forward, differentiated by JAX."""
  c = x.shape[-1]
  mean, var = plain.batch_stats(x.reshape(-1, c))
  return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias, mean, var


@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (16, 7), (2, 3, 3, 1)])
def test_fused_gradient_equals_autodiff_including_the_statistics(shape):
  kx, ks, kb, k1, k2, k3 = jax.random.split(jax.random.PRNGKey(len(shape)), 6)
  x = 3.0 * jax.random.normal(kx, shape) + 1.5
  c = shape[-1]
  scale, bias = jax.random.normal(ks, (c,)), jax.random.normal(kb, (c,))
  eps = jnp.float32(1e-5)
  # Cotangents on y and on the statistics (nonzero, so their terms are checked).
  probes = (jax.random.normal(k1, shape), jax.random.normal(k2, (c,)), jax.random.normal(k3, (c,)))

  def loss(fn):
    def f(x, scale, bias):
      return sum(jnp.sum(o * p) for o, p in zip(fn(x, scale, bias, eps), probes))
    return f

  for g, w in zip(norm_lib.batch_norm_train(x, scale, bias, eps),
                  _autodiff_train(x, scale, bias, eps)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(loss(norm_lib.batch_norm_train), (0, 1, 2)))(x, scale, bias)
  want = jax.jit(jax.grad(loss(_autodiff_train), (0, 1, 2)))(x, scale, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))


@pytest.mark.requires("native")
@pytest.mark.parametrize("shape,residual,relu", [
    ((4, 5, 5, 16), False, True),   # conv -> BN -> ReLU
    ((4, 5, 5, 16), True, True),    # the end of a residual block
    ((4, 5, 5, 16), False, False),  # the projection shortcut's BN
    ((16, 7), True, False),         # any channel count; a residual without ReLU
    ((2, 3, 3, 1), False, True),
])
def test_native_norm_kernels_equal_autodiff_with_residual_and_relu(shape, residual, relu):
  ks = jax.random.split(jax.random.PRNGKey(sum(shape)), 7)
  x = 3.0 * jax.random.normal(ks[0], shape) + 1.5
  c = shape[-1]
  scale, bias = jax.random.normal(ks[1], (c,)), jax.random.normal(ks[2], (c,))
  args = (x, scale, bias) + ((jax.random.normal(ks[3], shape),) if residual else ())
  probes = (jax.random.normal(ks[4], shape), jax.random.normal(ks[5], (c,)),
            jax.random.normal(ks[6], (c,)))

  def reference(x, scale, bias, *res):
    y, mean, var = _autodiff_train(x, scale, bias, jnp.float32(1e-5))
    y = y + res[0] if res else y
    return (jax.nn.relu(y) if relu else y), mean, var

  native = norm_lib.native_batch_norm_train(1e-5, relu, residual)

  def loss(fn):
    return lambda *a: sum(jnp.sum(o * p) for o, p in zip(fn(*a), probes))

  for g, w in zip(jax.jit(native)(*args), reference(*args)):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  argnums = tuple(range(len(args)))  # x, scale, bias (and the residual)
  got = jax.jit(jax.grad(loss(native), argnums))(*args)
  want = jax.jit(jax.grad(loss(reference), argnums))(*args)
  assert len(got) == len(want) == len(args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))


@pytest.mark.parametrize("cls", [plain.BatchNorm, norm_lib.FusedBatchNorm,
                                 pytest.param(norm_lib.NativeBatchNorm,
                                              marks=pytest.mark.requires("native"))])
def test_batch_norms_are_nn_batchnorm_in_variables_values_and_running_averages(cls):
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 5)) - 1.0
  kw = dict(momentum=0.9, epsilon=1e-5)
  ours, theirs = cls(**kw), nn.BatchNorm(**kw)
  v = theirs.init(jax.random.PRNGKey(1), x, use_running_average=False)
  assert (jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.PRNGKey(1), x,
                                                      use_running_average=False))
          == jax.tree_util.tree_map(jnp.shape, v))
  v = {"params": {"scale": jnp.linspace(0.5, 2, 5), "bias": jnp.linspace(-1, 1, 5)},
       "batch_stats": {"mean": jnp.full((5,), 0.3), "var": jnp.full((5,), 2.0)}}
  for use_ra in (False, True):
    a, sa = ours.apply(v, x, use_running_average=use_ra, mutable=["batch_stats"])
    b, sb = theirs.apply(v, x, use_running_average=use_ra, mutable=["batch_stats"])
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    jax.tree_util.tree_map(lambda p, q: np.testing.assert_allclose(p, q, rtol=1e-5, atol=1e-6),
                           sa, sb)
  # init does not move the running averages (as nn.BatchNorm)
  init = ours.init(jax.random.PRNGKey(1), x, use_running_average=False)["batch_stats"]
  np.testing.assert_array_equal(init["mean"], 0.0)
  np.testing.assert_array_equal(init["var"], 1.0)
  # the residual and ReLU come after the norm
  x16 = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 16))
  r = jax.random.normal(jax.random.PRNGKey(1), x16.shape)
  v16 = cls().init(jax.random.PRNGKey(2), x16, use_running_average=False)
  for use_ra in (False, True):
    alone, _ = cls().apply(v16, x16, use_running_average=use_ra, mutable=["batch_stats"])
    both, _ = cls().apply(v16, x16, use_running_average=use_ra, residual=r, relu=True,
                          mutable=["batch_stats"])
    np.testing.assert_allclose(both, jax.nn.relu(alone + r), rtol=1e-5, atol=1e-5)


# -- whole models: the CPU layers against the plain ones --------------------------

@pytest.mark.parametrize("choices,width", [
    # hand-written convolution gradients vs XLA's (the native kernels cover it in the fast loop)
    pytest.param(dict(conv="gemm"), 0.5, marks=pytest.mark.slow),
    # hand-written BatchNorm gradient vs JAX's
    pytest.param(dict(norm="fused"), 0.5, marks=pytest.mark.slow),
    # the native kernels; full width so that every stage has 16k channels
    pytest.param(dict(conv="native", norm="native", exit_head="native"), 1.0,
                 marks=pytest.mark.requires("native")),
])
def test_resnet_train_step_equals_the_plain_layers(choices, width):
  """One SGD step of an early-exit ResNet-8 (exit heads included): same loss,
  gradients and batch statistics with the CPU layers as with plain flax."""
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
  y = jnp.arange(8) % 10
  results = []
  for layers in (_layers(**choices), plain.PLAIN):
    model = resnet_lib.ResNet(depth=8, width_multiplier=width, exits=(0, 1), layers=layers)
    v = model.init({"params": jax.random.PRNGKey(1), "dropout": jax.random.PRNGKey(2)}, x)

    def loss(p):
      (outs, _), new = model.apply({"params": p, "batch_stats": v["batch_stats"]}, x,
                                   train=True, mutable=["batch_stats"],
                                   rngs={"dropout": jax.random.PRNGKey(3)})
      ce = sum(optax.softmax_cross_entropy_with_integer_labels(o, y).mean() for o in outs)
      return ce, new["batch_stats"]

    (value, stats), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(v["params"])
    results.append((value, stats, grads))
  (v1, s1, g1), (v2, s2, g2) = results
  np.testing.assert_allclose(v1, v2, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                         s1, s2)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
                         g1, g2)


@pytest.mark.requires("native")
def test_params_trained_on_one_path_give_the_same_logits_on_the_other():
  """The published ERDE student (trained with the CPU layers) in eval mode:
  same variable tree and, within float tolerance, the same exit logits with
  plain flax as with the native kernels (the exit-head kernel included)."""
  from adaptive_vision import export
  variables, meta = export.read("results/params/erde_student_s0.npz")
  cfg = ml_collections.ConfigDict(meta["model"])
  x = jax.random.normal(jax.random.key(4), (4, 32, 32, 3))
  out = {}
  for name, layers in (("plain", plain.PLAIN),
                       ("cpu", _layers(conv="native", norm="native", exit_head="native"))):
    model = models.build(cfg, layers=layers)
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False))
    assert (jax.tree_util.tree_map(jnp.shape, shapes)
            == jax.tree_util.tree_map(jnp.shape, variables))
    f = jax.jit(lambda v, x: model.apply(v, x, train=False)[0])
    out[name] = f(variables, x)
    if name == "cpu":
      assert "av_exit_head" in f.lower(variables, x).as_text()
  for a, b in zip(out["plain"], out["cpu"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


# The two attention layouts: tests/test_vit.py.


# -- the choice ----------------------------------------------------------------

@pytest.mark.requires("native")
def test_auto_is_native_on_one_device_and_xla_paths_on_several():
  one = cpu.resolve({}, num_devices=1)
  assert one == dict(conv="native", norm="fused", exit_head="native", decide="native",
                     attention="xla")
  several = cpu.resolve({}, num_devices=4)
  assert several == dict(conv="gemm", norm="fused", exit_head="xla", decide="xla",
                         attention="xla")
  assert cpu.resolve(dict(norm="native", conv="xla"), 1)["norm"] == "native"


@pytest.mark.requires("native")
def test_a_trainer_on_one_device_gets_the_native_layers():
  """The production CPU default, reached the way a run reaches it: the
  trainer's mesh of one device (no monkeypatching of the device count)."""
  from adaptive_vision import sharding
  from adaptive_vision.train import build as build_lib
  from configs import erde_cifar10
  config = erde_cifar10.get_config("role=teacher,runlocal")
  mesh = sharding.make_mesh(ml_collections.ConfigDict(dict(data=1, model=1)))
  trainer = build_lib.build(config, mesh, total_steps=1)
  layers = trainer.model.layers
  assert layers.conv is conv_lib.NativeConv and layers.batch_norm is norm_lib.FusedBatchNorm
  assert layers.exit_head_kernel is not None
  assert dict(trainer.backend.choices)["decide"] == "native"
  eight = build_lib.build(config, sharding.make_mesh(config.mesh), total_steps=1)
  assert eight.model.layers.conv is conv_lib.GemmConv
  assert eight.model.layers.exit_head_kernel is None


def test_choices_are_checked(monkeypatch):
  with pytest.raises(ValueError, match="backend.conv='cudnn'"):
    cpu.resolve(dict(conv="cudnn"), 1)
  with pytest.raises(ValueError, match="unknown backend switches"):
    cpu.resolve(dict(pooling="fast"), 1)
  from adaptive_vision.cpu.native import conv as native_conv
  monkeypatch.setattr(native_conv, "unavailable_reason", lambda: "no compiler here")
  monkeypatch.setattr(native_conv, "available", lambda: False)
  with pytest.raises(ValueError, match="no compiler here"):
    cpu.resolve(dict(conv="native"), 1)
  assert cpu.resolve({}, 1)["conv"] == "gemm"  # 'auto' falls back


def test_other_platforms_get_plain_layers():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))

  class FakeDevice:
    platform = "tpu"

  class FakeMesh:
    devices = np.array([FakeDevice()])

  be = backend.choose({}, FakeMesh(), "train")
  assert be.platform == "tpu" and be.layers is plain.PLAIN and be.compiler_options is None
  assert be.decide is None
  assert backend.choose({}, mesh, "serve").platform == "cpu"
