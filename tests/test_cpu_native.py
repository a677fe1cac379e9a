"""The native CPU kernels (adaptive_vision/cpu/native): all four build where a C++
compiler is, and each equals its XLA reference in value and gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_vision import early_exit, inference
from adaptive_vision.cpu import conv as conv_lib
from adaptive_vision.cpu.native import build
from adaptive_vision.cpu.native import conv as native_conv
from adaptive_vision.cpu.native import decide as native_decide
from adaptive_vision.cpu.native import head as native_head
from adaptive_vision.cpu.native import norm as native_norm

_PAD1 = ((1, 1), (1, 1))
KERNEL_MODULES = (native_conv, native_norm, native_head, native_decide)


@pytest.mark.requires("compiler")
def test_every_kernel_builds_wherever_a_compiler_is():
  # Otherwise the tests that require 'native' skip (or fail under CI=true)
  # with the reason; here the reason is shown for each of the four.
  assert jax.default_backend() == "cpu"
  for module in KERNEL_MODULES:
    assert module.unavailable_reason() is None, (module.__name__, module.unavailable_reason())
  # The guard covers every kernel file of the folder.
  sources = {p.stem for p in build.SOURCE_DIR.glob("*_kernels.cc")}
  assert sources == {m.KERNELS.name for m in KERNEL_MODULES}


def test_a_missing_compiler_is_a_clear_error(monkeypatch, tmp_path):
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-c++"))
  monkeypatch.setenv("ADAPTIVE_VISION_CACHE", str(tmp_path))
  with pytest.raises(build.NativeUnavailable, match="does not run"):
    build.library.__wrapped__("conv_kernels")


@pytest.mark.requires("native")
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
def test_conv_forward_and_gradients_equal_xla(kernel, stride, padding, size, cin, cout, batch):
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


@pytest.mark.requires("native")
def test_vmap_over_the_native_call():
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 3, 8, 8, 16))
  w = jax.random.normal(jax.random.PRNGKey(1), (3, 3, 16, 16))
  f = lambda fn: jax.vmap(lambda x: fn(x, w, (1, 1), _PAD1))
  np.testing.assert_allclose(f(conv_lib.native_conv2d)(x), f(conv_lib._xla_conv)(x),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.requires("native")
def test_native_conv_runs_the_kernels_where_they_apply():
  """16 output channels call the kernels; 7 (not a multiple of 16) take the
  GEMM path; both match XLA."""
  for features, expect_native in ((16, True), (7, False)):
    module = conv_lib.NativeConv(features, (3, 3), padding=_PAD1)
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, 8, 16))
    v = module.init(jax.random.PRNGKey(3), x)
    hlo = jax.jit(jax.grad(lambda v: jnp.sum(module.apply(v, x) ** 2))).lower(v).as_text()
    assert ("av_conv_forward" in hlo) == expect_native
    assert ("av_conv_weight_grad" in hlo) == expect_native
    ref = jax.lax.conv_general_dilated(x, v["params"]["kernel"], (1, 1), _PAD1,
                                       dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_allclose(module.apply(v, x), ref + v["params"]["bias"], rtol=1e-5,
                               atol=1e-4)


@pytest.mark.requires("native")
@pytest.mark.parametrize("shape,window,classes", [
    ((1, 32, 32, 16), (2, 2), 10),  # the ERDE student's first exit, batch 1
    # a batch: the images are shared out over the threads
    pytest.param((5, 16, 16, 32), (2, 2), 10, marks=pytest.mark.slow),
    # odd sizes drop the last row/column; channels not a multiple of 16
    pytest.param((2, 7, 5, 20), (2, 2), 10, marks=pytest.mark.slow),
    # a 1-pixel dimension is not pooled; fewer classes than a pass
    pytest.param((2, 9, 1, 16), (2, 1), 3, marks=pytest.mark.slow),
    ((3, 1, 1, 64), (1, 1), 100),   # CIFAR-100: several passes of dot products
    # the half-width student's 8 channels
    pytest.param((1, 8, 8, 8), (2, 2), 16, marks=pytest.mark.slow),
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


@pytest.mark.requires("native")
@pytest.mark.parametrize("criterion", ["entropy", "max_prob"])
def test_exit_decision_kernel_equals_xla(criterion):
  """The kernel against inference.decide_xla: fired rows, untouched decided
  rows, the last exit, huge logits (no overflow) and the `undecided` flag."""
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(9, 10)).astype(np.float32) * 3
  logits[3] *= 1e4  # softmax of huge logits: one class, entropy 0
  state = np.zeros((9, 11), np.float32)
  state[:, -1] = -1
  state[[2, 5], -1] = 0
  state[[2, 5], :10] = 7.0
  score = early_exit.softmax_entropy if criterion == "entropy" else early_exit.max_probability
  s = np.sort(np.asarray(score(jnp.asarray(logits))))
  threshold = np.float32(0.5 * (s[4] + s[5]))  # halfway between two scores: half the rows fire
  f = jax.jit(native_decide.decide, static_argnames=("exit", "last", "criterion"))
  for last in (False, True):
    got = f(logits, state, threshold, exit=1, last=last, criterion=criterion)
    want = inference.decide_xla(logits, state, threshold, exit=1, last=last,
                                criterion=criterion)
    np.testing.assert_array_equal(got[0], want[0])
    assert bool(got[1]) == bool(want[1]) == (not last)
    np.testing.assert_array_equal(np.asarray(got[0])[[2, 5]], state[[2, 5]])  # decided: untouched
  everyone = np.float32(1e9 if criterion == "entropy" else -1.0)
  state2, undecided = f(logits, state, everyone, exit=0, last=False, criterion=criterion)
  assert not bool(undecided) and set(np.asarray(state2)[:, -1]) == {0.0}
  with pytest.raises(ValueError, match="unknown exit criterion"):
    native_decide.decide(logits, state, threshold, exit=0, last=False, criterion="margin")
