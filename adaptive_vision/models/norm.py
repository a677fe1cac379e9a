"""BatchNorm whose training-mode gradient is written by hand (fewer passes on CPU).

Autodiff of BatchNorm's training forward (mean, E[x^2] - mean^2, normalize,
scale, shift) leaves XLA:CPU a backward of several elementwise passes and
reductions over the activation, each a trip through memory. The closed form

    xhat = (x - mean) * rsqrt(var + eps),  y = scale * xhat + bias
    dbias = sum(dy),  dscale = sum(dy * xhat)
    dx = scale * rsqrt(var + eps) / n * (n * dy - dbias - xhat * dscale)

needs one fused pass for the two channel sums and one for dx. The batch
statistics are outputs too (they update the running averages); their
cotangents are added exactly, so this is BatchNorm's gradient, not an
approximation (tests/test_norm.py checks values and gradients against
`flax.linen.BatchNorm`).

`BatchNorm` here is a drop-in for the ResNets' `nn.BatchNorm`: the same
variables ('scale', 'bias' params; 'mean', 'var' batch_stats), defaults,
fast variance (clipped at 0) and running-average update, so checkpoints
restore. It also takes the ReLU and the residual addition that follow it in
the ResNets (`relu=True`, `residual=...`), so that one implementation can do
all three at once: 'native' runs the forward and this gradient as C++ kernels
on all CPU threads (adaptive_vision/native/norm_kernels.cc, one device only),
where XLA:CPU runs its elementwise fusions on one. On a 2-core machine they
were 0.99-1.04x of the XLA fusions in the ResNet-20 step (memory-bound
either way; results/bench_notes.md), so they are opt-in: `implementation='auto'`
is this gradient ('fused') on CPU and JAX's autodiff of the same forward on
GPU/TPU (as `models.conv` does).
"""

from __future__ import annotations

import functools
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from adaptive_vision import models
from adaptive_vision.native import norm as native_norm

NORM_IMPLEMENTATIONS = ("auto", "autodiff", "fused", "native")


def resolve_implementation(implementation: str) -> str:
  if implementation == "native" and not native_norm.available():
    raise ValueError(f"BatchNorm implementation 'native' is unavailable: "
                     f"{native_norm.unavailable_reason()}")
  return models.resolve_implementation(implementation, NORM_IMPLEMENTATIONS, "BatchNorm",
                                       cpu="fused", elsewhere="autodiff")


def _stats(x2):
  """Per-channel mean and fast variance (E[x^2] - mean^2, clipped at 0) of [n, C]."""
  mean = jnp.mean(x2, axis=0)
  var = jnp.maximum(0.0, jnp.mean(lax.square(x2), axis=0) - lax.square(mean))
  return mean, var


@jax.custom_vjp
def batch_norm_train(x, scale, bias, epsilon):
  """(y, mean, var): x normalized by its own statistics over all but the last axis."""
  return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
  c = x.shape[-1]
  mean, var = _stats(x.reshape(-1, c))
  inv = lax.rsqrt(var + epsilon)
  y = (x - mean) * (inv * scale) + bias
  return (y, mean, var), (x, scale, mean, var, inv, epsilon)


def _backward(res, cotangents):
  x, scale, mean, var, inv, epsilon = res
  dy, dmean, dvar = cotangents
  c = x.shape[-1]
  n = x.size // c
  xhat = (x - mean) * inv
  dbias = jnp.sum(dy.reshape(-1, c), axis=0)
  dscale = jnp.sum((dy * xhat).reshape(-1, c), axis=0)
  dx = (scale * inv / n) * (n * dy - dbias - xhat * dscale)
  # The statistics' own cotangents (zero when they only feed the running
  # averages): d mean/dx = 1/n; d var/dx = 2 (x - mean)/n where var > 0.
  dvar = jnp.where(var > 0, dvar, 0.0)
  dx = dx + (dmean + 2.0 * dvar * (x - mean)) / n
  return dx, dscale, dbias, jnp.zeros_like(epsilon)


batch_norm_train.defvjp(_forward, _backward)


@functools.cache
def native_batch_norm_train(epsilon: float, relu: bool, residual: bool):
  """f(x, scale, bias[, residual]) -> (act(BN(x) [+ residual]), mean, var) through
  the native kernels, with the gradient above (act: ReLU if `relu`)."""

  def fwd(x, scale, bias, *res):
    y, mean, var = native_norm.forward(x, scale, bias, res[0] if residual else None, epsilon,
                                       relu)
    return (y, mean, var), (x, y, scale, mean, var)

  def bwd(saved, cotangents):
    x, y, scale, mean, var = saved
    dy, dmean, dvar = cotangents
    return tuple(native_norm.backward(x, y, dy, scale, mean, var, dmean, dvar, epsilon, relu,
                                      residual))

  f = jax.custom_vjp(lambda *args: fwd(*args)[0])
  f.defvjp(fwd, bwd)
  return f


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over all axes but the last, with the gradient above.

  Attributes as `nn.BatchNorm` (use_running_average, momentum, epsilon,
  dtype, param_dtype) plus implementation: 'native' (the C++ kernels, float32
  on one CPU device), 'fused' (the gradient above), 'autodiff' (JAX's gradient
  of the same forward), or 'auto' ('fused' on CPU, 'autodiff' on GPU/TPU).

  `__call__(x, residual=None, relu=False)` returns BN(x), plus `residual` when
  given, then ReLU when `relu`.
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32
  implementation: str = "auto"

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None, *, residual=None,
               relu: bool = False, fold: bool = False):
    """act(BN(x) [+ residual]), act = ReLU if `relu`. With `fold=True` (running
    averages only) returns instead float32 (a, b) with BN(x) = x * a + b, for a
    kernel that applies it itself (models.exit_heads)."""
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    c = x.shape[-1]
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    dtype = self.dtype or jnp.result_type(x, scale)
    if fold:
      if not use_ra:
        raise ValueError("BatchNorm(fold=True) folds the running averages: "
                         "use_running_average must be True")
      a = scale.astype(jnp.float32) * lax.rsqrt(ra_var.value + self.epsilon)
      return a, bias.astype(jnp.float32) - ra_mean.value * a
    implementation = resolve_implementation(self.implementation)
    if implementation == "native" and not native_norm.supports(x.dtype, dtype):
      implementation = "fused"
    if not use_ra and implementation == "native":
      f = native_batch_norm_train(float(self.epsilon), bool(relu), residual is not None)
      extra = () if residual is None else (residual.astype(jnp.float32),)
      y, mean, var = f(x, scale.astype(jnp.float32), bias.astype(jnp.float32), *extra)
      self._update_averages(ra_mean, ra_var, mean, var)
      return y.astype(dtype)
    if use_ra or implementation == "autodiff":
      if use_ra:
        mean, var = ra_mean.value, ra_var.value
      else:
        mean, var = _stats(x.astype(jnp.float32).reshape(-1, c))
      y = (x.astype(jnp.float32) - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias
    else:
      y, mean, var = batch_norm_train(x.astype(jnp.float32), scale.astype(jnp.float32),
                                      bias.astype(jnp.float32),
                                      jnp.asarray(self.epsilon, jnp.float32))
    if not use_ra:
      self._update_averages(ra_mean, ra_var, mean, var)
    if residual is not None:
      y = y + residual.astype(jnp.float32)
    if relu:
      y = nn.relu(y)
    return y.astype(dtype)

  def _update_averages(self, ra_mean, ra_var, mean, var):
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * lax.stop_gradient(mean)
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * lax.stop_gradient(var)
