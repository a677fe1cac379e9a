"""The hand-written BatchNorm gradient equals autodiff, and the module is nn.BatchNorm."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adaptive_vision.models import norm as norm_lib


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


def test_module_is_nn_batchnorm_in_variables_values_and_running_averages():
  x = 2.0 * jax.random.normal(jax.random.PRNGKey(0), (6, 4, 4, 5)) - 1.0
  kw = dict(momentum=0.9, epsilon=1e-5)
  ours, theirs = norm_lib.BatchNorm(**kw, implementation="fused"), nn.BatchNorm(**kw)
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


# The ResNet train step with this gradient vs autodiff:
# tests/test_conv.py::test_resnet_train_step_equals_the_reference_path[norm-fused-autodiff].
