"""The hand-written BatchNorm gradient and the native kernels equal autodiff, and
the module is nn.BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_vision.models import norm as norm_lib
from adaptive_vision.native import norm as native_norm

needs_native = pytest.mark.skipif(not native_norm.available(),
                                  reason="native CPU kernels not built here")


def _autodiff_train(x, scale, bias, epsilon):
  """The same forward, differentiated by JAX."""
  c = x.shape[-1]
  mean, var = norm_lib._stats(x.reshape(-1, c))
  return (x - mean) * (jax.lax.rsqrt(var + epsilon) * scale) + bias, mean, var


@pytest.mark.parametrize("shape", [(4, 5, 5, 3), (16, 7), (2, 3, 3, 1)])
def test_gradient_equals_autodiff_including_the_statistics(shape):
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

  got_out = norm_lib.batch_norm_train(x, scale, bias, eps)
  want_out = _autodiff_train(x, scale, bias, eps)
  for g, w in zip(got_out, want_out):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)
  got = jax.jit(jax.grad(loss(norm_lib.batch_norm_train), (0, 1, 2)))(x, scale, bias)
  want = jax.jit(jax.grad(loss(_autodiff_train), (0, 1, 2)))(x, scale, bias)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4 * float(jnp.abs(w).max()))


@needs_native
@pytest.mark.parametrize("shape,residual,relu", [
    ((4, 5, 5, 16), False, True),   # conv -> BN -> ReLU
    ((4, 5, 5, 16), True, True),    # the end of a residual block
    ((4, 5, 5, 16), False, False),  # the projection shortcut's BN
    ((16, 7), True, False),         # any channel count; a residual without ReLU
    ((2, 3, 3, 1), False, True),
])
def test_native_kernels_equal_autodiff_with_residual_and_relu(shape, residual, relu):
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


@pytest.mark.parametrize("implementation", [
    "fused", pytest.param("native", marks=needs_native)])
def test_module_is_nn_batchnorm_in_variables_values_and_running_averages(implementation):
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 5)) - 1.0
  kw = dict(momentum=0.9, epsilon=1e-5)
  ours, theirs = norm_lib.BatchNorm(**kw, implementation=implementation), nn.BatchNorm(**kw)
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


def test_unknown_implementation_is_refused():
  with pytest.raises(ValueError, match="BatchNorm implementation"):
    norm_lib.resolve_implementation("cudnn")
  assert norm_lib.resolve_implementation("auto") == (
      "fused" if jax.default_backend() == "cpu" else "autodiff")


def test_explicit_native_says_why_it_is_unavailable(monkeypatch):
  monkeypatch.setattr(native_norm, "available", lambda: False)
  monkeypatch.setattr(native_norm, "unavailable_reason", lambda: "no compiler here")
  with pytest.raises(ValueError, match="no compiler here"):
    norm_lib.resolve_implementation("native")


@pytest.mark.parametrize("implementation", [
    "fused", "autodiff", pytest.param("native", marks=needs_native)])
def test_residual_and_relu_options_are_added_after_the_norm(implementation):
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 3, 16))
  r = jax.random.normal(jax.random.PRNGKey(1), x.shape)
  bn = norm_lib.BatchNorm(implementation=implementation)
  v = bn.init(jax.random.PRNGKey(2), x, use_running_average=False)
  for use_ra in (False, True):
    plain, _ = bn.apply(v, x, use_running_average=use_ra, mutable=["batch_stats"])
    both, _ = bn.apply(v, x, use_running_average=use_ra, residual=r, relu=True,
                       mutable=["batch_stats"])
    np.testing.assert_allclose(both, jax.nn.relu(plain + r), rtol=1e-5, atol=1e-5)


# The ResNet train step with this gradient vs autodiff:
# tests/test_conv.py::test_resnet_train_step_equals_the_reference_path[norm-fused-autodiff].


def test_fold_returns_the_running_average_affine():
  x = jax.random.normal(jax.random.key(0), (4, 5, 5, 8)) * 3 + 1
  bn = norm_lib.BatchNorm(use_running_average=True)
  v = bn.init(jax.random.key(1), x)
  v = jax.tree_util.tree_map(lambda a: a + jax.random.uniform(jax.random.key(2), a.shape), v)
  a, b = bn.apply(v, x, fold=True)
  np.testing.assert_allclose(x * a + b, bn.apply(v, x), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="use_running_average must be True"):
    norm_lib.BatchNorm(use_running_average=False).apply(v, x, fold=True,
                                                        mutable=["batch_stats"])
