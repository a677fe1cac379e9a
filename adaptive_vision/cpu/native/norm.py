"""The BatchNorm kernels of norm_kernels.cc as JAX operations (CPU only).

`forward(x, scale, bias, residual, epsilon, relu)` returns
`(act(BN(x) [+ residual]), mean, var)` with BatchNorm's training statistics
(over all axes but the last; fast variance, clipped at 0) and act = ReLU or
the identity; `backward` returns the gradients with respect to x, scale, bias
(and the residual). float32 only (`supports`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_vision.cpu.native import build

KERNELS = build.Kernels("norm_kernels", ("av_batch_norm_forward", "av_batch_norm_add_forward",
                                         "av_batch_norm_backward", "av_batch_norm_add_backward"))
unavailable_reason = KERNELS.unavailable_reason  # None where the kernels can run, else why not
available = KERNELS.available
supports = build.float32_only


def _call(target, outs, *args, epsilon, relu):
  KERNELS.register()
  return jax.ffi.ffi_call(target, outs, vmap_method="sequential")(
      *args, eps=np.float32(epsilon), relu=bool(relu))


def forward(x, scale, bias, residual, epsilon: float, relu: bool):
  """(y, mean, var): y = act(scale * (x - mean) / sqrt(var + eps) + bias [+ residual])."""
  c = x.shape[-1]
  stat = jax.ShapeDtypeStruct((c,), jnp.float32)
  outs = (jax.ShapeDtypeStruct(x.shape, jnp.float32), stat, stat)
  if residual is None:
    return _call("av_batch_norm_forward", outs, x, scale, bias, epsilon=epsilon, relu=relu)
  return _call("av_batch_norm_add_forward", outs, x, scale, bias, residual, epsilon=epsilon,
               relu=relu)


def backward(x, y, dy, scale, mean, var, dmean, dvar, epsilon: float, relu: bool,
             residual: bool):
  """(dx, dscale, dbias[, dresidual]) of `forward`'s outputs' cotangents (dy,
  dmean, dvar); y is forward's output (the ReLU's mask)."""
  c = x.shape[-1]
  full = jax.ShapeDtypeStruct(x.shape, jnp.float32)
  stat = jax.ShapeDtypeStruct((c,), jnp.float32)
  outs = (full, stat, stat) + ((full,) if residual else ())
  target = "av_batch_norm_add_backward" if residual else "av_batch_norm_backward"
  return _call(target, outs, x, y, dy, scale, mean, var, dmean, dvar, epsilon=epsilon, relu=relu)
