"""The layers the models are built from, and the one seam that swaps them.

A model reads its convolution, BatchNorm, exit-head kernel and attention
implementation from one `Layers` value (the `layers` field of every family's
module; `models.build(cfg, layers=...)`). `PLAIN` is plain flax and JAX, the
default on every backend. A backend package may hand the models faster
implementations with the same variables (names, shapes, initializers), so a
checkpoint or parameters file trained with one gives the same logits with
the other: on CPU, `adaptive_vision.cpu.layers` (chosen once per run by
`adaptive_vision.backend`).

    Layers.conv        a module class with `nn.Conv`'s fields and variables
    Layers.batch_norm  a module class with `BatchNorm`'s (below) fields and variables
    Layers.exit_head_kernel
                       None, or f(x, scale, shift, kernel, bias, window) computing
                       an ERDE exit head at inference in one call (models.exit_heads)
    Layers.attention   'fused' (jax.nn.dot_product_attention) or 'xla' (einsums in a
                       heads-first layout; models.vit.Attention)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

ATTENTIONS = ("fused", "xla")


def batch_stats(x2):
  """Per-channel mean and fast variance (E[x^2] - mean^2, clipped at 0) of [n, C]."""
  mean = jnp.mean(x2, axis=0)
  var = jnp.maximum(0.0, jnp.mean(lax.square(x2), axis=0) - lax.square(mean))
  return mean, var


class BatchNorm(nn.Module):
  """`nn.BatchNorm` over all axes but the last (same variables: 'scale' and
  'bias' params, 'mean' and 'var' batch_stats; same defaults, fast variance and
  running-average update), that also takes the residual addition and ReLU that
  follow it in the ResNets: `__call__(x, residual=None, relu=False)` returns
  act(BN(x) [+ residual]), act = ReLU if `relu`, so that a backend's
  implementation may do all three in one pass.
  """
  use_running_average: Optional[bool] = None
  momentum: float = 0.99
  epsilon: float = 1e-5
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def variables_of(self, c: int):
    """(running mean, running var) variables and (scale, bias) params for C channels."""
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
    scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
    return ra_mean, ra_var, scale, bias

  def normalize(self, x, mean, var, scale, bias):
    return (x.astype(jnp.float32) - mean) * (lax.rsqrt(var + self.epsilon) * scale) + bias

  def update_averages(self, ra_mean, ra_var, mean, var):
    if not self.is_initializing():
      m = self.momentum
      ra_mean.value = m * ra_mean.value + (1 - m) * lax.stop_gradient(mean)
      ra_var.value = m * ra_var.value + (1 - m) * lax.stop_gradient(var)

  @nn.compact
  def __call__(self, x, use_running_average: Optional[bool] = None, *, residual=None,
               relu: bool = False):
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    c = x.shape[-1]
    ra_mean, ra_var, scale, bias = self.variables_of(c)
    dtype = self.dtype or jnp.result_type(x, scale)
    if use_ra:
      mean, var = ra_mean.value, ra_var.value
    else:
      mean, var = batch_stats(x.astype(jnp.float32).reshape(-1, c))
      self.update_averages(ra_mean, ra_var, mean, var)
    y = self.normalize(x, mean, var, scale, bias)
    if residual is not None:
      y = y + residual.astype(jnp.float32)
    if relu:
      y = nn.relu(y)
    return y.astype(dtype)


@dataclasses.dataclass(frozen=True)
class Layers:
  """Where a model's layers come from (see the module docstring). Hashable, so
  a model holding it stays usable as a static jit argument."""
  conv: type = nn.Conv
  batch_norm: type = BatchNorm
  exit_head_kernel: Optional[Callable] = None
  attention: str = "fused"
  name: str = "plain"

  def __post_init__(self):
    if self.attention not in ATTENTIONS:
      raise ValueError(f"attention implementation {self.attention!r}; use one of {ATTENTIONS}")


PLAIN = Layers()
