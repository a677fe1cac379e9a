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

`FusedBatchNorm` and `NativeBatchNorm` are the CPU's implementations of
`models.layers.BatchNorm` (same variables, defaults, fast variance and
running-average update, so checkpoints restore either way), chosen by
`adaptive_vision.cpu.layers`. `FusedBatchNorm` trains with the gradient above;
`NativeBatchNorm` runs the forward (with the residual and ReLU after it) and
this gradient as C++ kernels on all CPU threads
(adaptive_vision/cpu/native/norm_kernels.cc, one device only), where XLA:CPU
runs its elementwise fusions on one. On a 2-core machine they were 0.99-1.04x
of the XLA fusions in the ResNet-20 step (memory-bound either way;
results/bench_notes.md), so they are opt-in ('fused' is the CPU default).
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from adaptive_vision.cpu.native import norm as native_norm
from adaptive_vision.models.layers import BatchNorm, batch_stats


@jax.custom_vjp
def batch_norm_train(x, scale, bias, epsilon):
  """(y, mean, var): x normalized by its own statistics over all but the last axis."""
  return _forward(x, scale, bias, epsilon)[0]


def _forward(x, scale, bias, epsilon):
  c = x.shape[-1]
  mean, var = batch_stats(x.reshape(-1, c))
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


class FusedBatchNorm(BatchNorm):
  """`models.layers.BatchNorm` training with the hand-written gradient above."""

  @nn.compact
  def __call__(self, x, use_running_average=None, *, residual=None, relu: bool = False):
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    if use_ra:
      return super().__call__(x, use_running_average, residual=residual, relu=relu)
    ra_mean, ra_var, scale, bias = self.variables_of(x.shape[-1])
    dtype = self.dtype or jnp.result_type(x, scale)
    y, mean, var = batch_norm_train(x.astype(jnp.float32), scale.astype(jnp.float32),
                                    bias.astype(jnp.float32),
                                    jnp.asarray(self.epsilon, jnp.float32))
    self.update_averages(ra_mean, ra_var, mean, var)
    if residual is not None:
      y = y + residual.astype(jnp.float32)
    if relu:
      y = nn.relu(y)
    return y.astype(dtype)


class NativeBatchNorm(FusedBatchNorm):
  """Training-mode BatchNorm (+ residual, + ReLU) as the native kernels, float32
  on one CPU device; other dtypes and inference take `FusedBatchNorm`'s path."""

  @nn.compact
  def __call__(self, x, use_running_average=None, *, residual=None, relu: bool = False):
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    dtype = self.dtype or jnp.result_type(x, self.param_dtype)
    if use_ra or not native_norm.supports(x.dtype, dtype):
      return super().__call__(x, use_running_average, residual=residual, relu=relu)
    ra_mean, ra_var, scale, bias = self.variables_of(x.shape[-1])
    f = native_batch_norm_train(float(self.epsilon), bool(relu), residual is not None)
    extra = () if residual is None else (residual.astype(jnp.float32),)
    y, mean, var = f(x, scale.astype(jnp.float32), bias.astype(jnp.float32), *extra)
    self.update_averages(ra_mean, ra_var, mean, var)
    return y.astype(dtype)
