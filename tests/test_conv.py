"""The hand-written convolution gradients equal XLA's, and ResNets train the same with the
hand-written convolution and BatchNorm gradients as with the reference ones."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_vision.models import conv as conv_lib
from adaptive_vision.models import resnet as resnet_lib
from adaptive_vision.native import conv as native_conv
from adaptive_vision.native import norm as native_norm

_PAD1 = ((1, 1), (1, 1))
_PAD0 = ((0, 0), (0, 0))


@pytest.mark.parametrize("kernel,stride,padding,size,cin,cout,batch", [
    (3, 1, _PAD1, 8, 5, 7, 3),     # the ResNet 3x3 convolutions
    (3, 2, _PAD1, 8, 5, 7, 3),     # first convolution of a stage
    (3, 2, _PAD1, 7, 3, 4, 2),     # odd size
    (1, 2, _PAD0, 8, 5, 7, 3),     # option-B projection shortcut
    (1, 1, _PAD0, 6, 4, 6, 2),     # 1x1, stride 1
    (4, 4, _PAD0, 16, 3, 8, 2),    # a ViT patch embedding
    (3, 1, ((0, 2), (1, 0)), 6, 2, 3, 5),  # asymmetric padding
])
def test_gradients_equal_xla(kernel, stride, padding, size, cin, cout, batch):
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


def test_conv_module_has_nn_conv_parameters():
  import flax.linen as nn
  x = jnp.ones((2, 8, 8, 3))
  ours = conv_lib.Conv(4, (3, 3), strides=2, padding=_PAD1, use_bias=True,
                       implementation="gemm")
  theirs = nn.Conv(4, (3, 3), strides=2, padding=_PAD1, use_bias=True)
  p_ours = ours.init(jax.random.PRNGKey(0), x)
  p_theirs = theirs.init(jax.random.PRNGKey(0), x)
  assert jax.tree_util.tree_map(jnp.shape, p_ours) == jax.tree_util.tree_map(jnp.shape, p_theirs)
  np.testing.assert_allclose(p_ours["params"]["kernel"], p_theirs["params"]["kernel"])
  np.testing.assert_allclose(ours.apply(p_theirs, x), theirs.apply(p_theirs, x),
                             rtol=1e-5, atol=1e-5)
  for padding in ("SAME", "VALID"):
    a = conv_lib.Conv(4, (3, 3), strides=2, padding=padding)
    b = nn.Conv(4, (3, 3), strides=2, padding=padding)
    v = b.init(jax.random.PRNGKey(1), jnp.ones((1, 7, 7, 3)))
    np.testing.assert_allclose(a.apply(v, jnp.ones((1, 7, 7, 3))),
                               b.apply(v, jnp.ones((1, 7, 7, 3))), rtol=1e-5, atol=1e-5)


def test_unknown_implementation_is_refused():
  with pytest.raises(ValueError, match="convolution implementation"):
    conv_lib.resolve_implementation("cudnn")
  if jax.default_backend() != "cpu":
    assert conv_lib.resolve_implementation("auto") == "xla"
  elif jax.device_count() == 1 and native_conv.available():
    assert conv_lib.resolve_implementation("auto") == "native"
  else:
    assert conv_lib.resolve_implementation("auto") == "gemm"


@pytest.mark.parametrize("field,ours,reference,width", [
    ("conv", "gemm", "xla", 0.5),        # hand-written convolution gradients vs XLA's
    ("norm", "fused", "autodiff", 0.5),  # hand-written BatchNorm gradient vs JAX's
    # the native kernels (CPU); full width so that every stage has 16k channels
    pytest.param("conv", "native", "xla", 1.0, marks=pytest.mark.skipif(
        not native_conv.available(), reason="native CPU kernels not built here")),
    # the native BatchNorm + residual + ReLU kernels (CPU)
    pytest.param("norm", "native", "autodiff", 0.5, marks=pytest.mark.skipif(
        not native_norm.available(), reason="native CPU kernels not built here")),
])
def test_resnet_train_step_equals_the_reference_path(field, ours, reference, width):
  """One SGD step of an early-exit ResNet-8 (exit heads included): same loss,
  gradients and batch statistics with the hand-written gradients or kernels as
  with the reference ones."""
  import optax
  x = jax.random.normal(jax.random.PRNGKey(0), (8, 32, 32, 3))
  y = jnp.arange(8) % 10
  results = []
  for impl in (ours, reference):
    model = resnet_lib.ResNet(depth=8, width_multiplier=width, exits=(0, 1), **{field: impl})
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
