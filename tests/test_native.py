"""The native CPU convolution kernels (adaptive_vision/native): they build where a
C++ compiler is, equal XLA's convolution in value and gradient, and 'auto' uses them."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_vision.models import conv as conv_lib
from adaptive_vision.native import build
from adaptive_vision.native import conv as native_conv
from adaptive_vision.native import head as native_head
from adaptive_vision.native import norm as native_norm

needs_native = pytest.mark.skipif(not native_conv.available(),
                                  reason="native CPU kernels not built here")


@pytest.mark.skipif(jax.default_backend() != "cpu" or build.compiler() is None,
                    reason="needs the CPU backend and a C++ compiler")
def test_kernels_build_wherever_a_compiler_is():
  # Otherwise the tests marked needs_native (here and in test_norm.py) skip
  # silently after a build error.
  assert native_conv.unavailable_reason() is None
  assert native_norm.unavailable_reason() is None
  assert native_head.unavailable_reason() is None


def test_a_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
  monkeypatch.setenv("ADAPTIVE_VISION_CACHE", str(tmp_path))
  with pytest.raises(build.NativeUnavailable, match="does not run"):
    build.library.__wrapped__("conv_kernels")


def test_explicit_native_says_why_it_is_unavailable(monkeypatch):
  monkeypatch.setattr(native_conv, "available", lambda: False)
  monkeypatch.setattr(native_conv, "unavailable_reason", lambda: "no compiler here")
  with pytest.raises(ValueError, match="no compiler here"):
    conv_lib.resolve_implementation("native")


_PAD1 = ((1, 1), (1, 1))


@needs_native
@pytest.mark.parametrize("kernel,stride,padding,size,cin,cout,batch", [
    (3, 1, _PAD1, 8, 16, 16, 3),             # ResNet 3x3, first stage
    (3, 1, _PAD1, 4, 64, 64, 2),             # last stage
    (3, 2, ((0, 1), (0, 1)), 8, 16, 32, 3),  # first convolution of a stage ('SAME')
    (3, 2, _PAD1, 7, 32, 32, 2),             # odd size
    (1, 2, ((0, 0), (0, 0)), 8, 16, 32, 3),  # option-B projection shortcut
    (3, 1, _PAD1, 9, 3, 16, 2),              # the stem: 3 input channels
    (3, 1, ((0, 2), (1, 0)), 6, 16, 32, 5),  # asymmetric padding, 32 outputs
    (5, 1, ((2, 2), (2, 2)), 13, 16, 16, 1),  # wider kernel; 13 pixels: two register tiles
])
def test_forward_and_gradients_equal_xla(kernel, stride, padding, size, cin, cout, batch):
  kx, kw, kc = jax.random.split(jax.random.PRNGKey(kernel * 10 + stride + cin), 3)
  x = jax.random.normal(kx, (batch, size, size, cin))
  w = jax.random.normal(kw, (kernel, kernel, cin, cout)) / np.sqrt(kernel * kernel * cin)
  strides = (stride, stride)
  ref = conv_lib._xla_conv(x, w, strides, padding)
  probe = jax.random.normal(kc, ref.shape)

  def loss(fn):
    return lambda x, w: jnp.sum(fn(x, w, strides, padding) * probe)

  got_y = jax.jit(conv_lib.native_conv2d, static_argnums=(2, 3))(x, w, strides, padding)
  np.testing.assert_allclose(got_y, ref, rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(loss(conv_lib.native_conv2d), (0, 1)))(x, w)
  want = jax.jit(jax.grad(loss(conv_lib._xla_conv), (0, 1)))(x, w)
  for g, r in zip(got, want):
    assert g.shape == r.shape
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5 * float(jnp.abs(r).max()))


@needs_native
def test_vmap_over_the_native_call():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8, 8, 16))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 16))
  f = lambda fn: jax.vmap(lambda x: fn(x, w, (1, 1), _PAD1))
  np.testing.assert_allclose(f(conv_lib.native_conv2d)(x), f(conv_lib._xla_conv)(x),
                             rtol=1e-5, atol=1e-5)


@needs_native
def test_auto_runs_the_kernels_and_leaves_the_rest_to_gemm(monkeypatch):
  """On one CPU device 'auto' calls the kernels where they apply; 7 output
  channels (not a multiple of 16) take the GEMM path and still match XLA.
  With several devices 'auto' is 'gemm' (a custom call is not split over
  devices: XLA would gather the batch onto each)."""
  assert jax.device_count() > 1  # the test session's 8 host devices
  assert conv_lib.resolve_implementation("auto") == "gemm"
  monkeypatch.setattr(jax, "device_count", lambda *a: 1)
  assert conv_lib.resolve_implementation("auto") == "native"
  for features, expect_native in ((16, True), (7, False)):
    module = conv_lib.Conv(features, (3, 3), padding=_PAD1, implementation="auto")
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 16))
    v = module.init(jax.random.PRNGKey(3), x)
    hlo = jax.jit(jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2))).lower(v).as_text()
    assert ("av_conv_forward" in hlo) == expect_native
    assert ("av_conv_weight_grad" in hlo) == expect_native
    ref = conv_lib.Conv(features, (3, 3), padding=_PAD1, implementation="xla")
    np.testing.assert_allclose(module.apply(v, x), ref.apply(v, x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not native_head.available(), reason="native CPU kernels not built here")
@pytest.mark.parametrize("shape,window,classes", [
    ((1, 32, 32, 16), (2, 2), 10),  # the ERDE student's first exit, batch 1
    ((5, 16, 16, 32), (2, 2), 10),  # a batch: the images are shared out over the threads
    ((2, 7, 5, 20), (2, 2), 10),    # odd sizes drop the last row/column; channels not a multiple of 16
    ((2, 9, 1, 16), (2, 1), 3),     # a 1-pixel dimension is not pooled; fewer classes than a pass
    ((3, 1, 1, 64), (1, 1), 100),   # CIFAR-100: several passes of dot products
    ((1, 8, 8, 8), (2, 2), 16),     # the half-width student's 8 channels
])
def test_exit_head_kernel_equals_xla(shape, window, classes):
  rng = np.random.default_rng(0)
  c = shape[-1]
  args = [rng.normal(size=shape), rng.uniform(0.5, 1.5, size=c), rng.normal(size=c),
          rng.normal(size=((shape[1] // window[0]) * (shape[2] // window[1]) * c, classes)),
          rng.normal(size=(classes,))]
  args = [jnp.asarray(a.astype(np.float32)) for a in args]
  f = jax.jit(native_head.exit_head, static_argnums=5)
  np.testing.assert_allclose(f(*args, window), native_head.reference(*args, window),
                             rtol=1e-5, atol=1e-4)
  assert "av_exit_head" in f.lower(*args, window).as_text()
  # Its gradient is the reference's.
  loss = lambda f: lambda *a: jnp.sum(jnp.sin(f(*a, window)))
  for g, r in zip(jax.grad(loss(native_head.exit_head), argnums=range(5))(*args),
                  jax.grad(loss(native_head.reference), argnums=range(5))(*args)):
    # sums of thousands of terms: errors relative to the gradient's scale
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5 * float(np.abs(r).max()) + 1e-4)
