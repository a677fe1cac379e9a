"""The exit head at inference (head_kernels.cc) as a JAX operation.

`exit_head(x, scale, shift, kernel, bias, window)` equals
`avg_pool(relu(x * scale + shift), window, strides=window, 'VALID').reshape(B, -1)
@ kernel + bias` for float32 NHWC `x` on the CPU: BatchNorm with its running
averages folded into `scale` and `shift`, ReLU, pooling, dense. Its gradient
is that expression's (JAX recomputes it): the kernel is for inference, where
models.exit_heads uses it.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from adaptive_vision.cpu.native import build

KERNELS = build.Kernels("head_kernels", ("av_exit_head",))
unavailable_reason = KERNELS.unavailable_reason  # None where the kernels can run, else why not
available = KERNELS.available
supports = build.float32_only


def reference(x, scale, shift, kernel, bias, window: tuple[int, int]):
  """The same in XLA ops (this op's gradient)."""
  x = jnp.maximum(x * scale + shift, 0.0)
  if tuple(window) != (1, 1):
    x = nn.avg_pool(x, tuple(window), strides=tuple(window), padding="VALID")
  return jnp.dot(x.reshape(x.shape[0], -1), kernel) + bias


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def exit_head(x, scale, shift, kernel, bias, window: tuple[int, int]):
  KERNELS.register()
  out = jax.ShapeDtypeStruct((x.shape[0], kernel.shape[1]), jnp.float32)
  return jax.ffi.ffi_call("av_exit_head", out, vmap_method="sequential")(
      x, scale, shift, kernel.T, bias, wh=np.int64(window[0]), ww=np.int64(window[1]))


def _fwd(x, scale, shift, kernel, bias, window):
  return exit_head(x, scale, shift, kernel, bias, window), (x, scale, shift, kernel, bias)


def _bwd(window, res, dy):
  return jax.vjp(lambda *a: reference(*a, window), *res)[1](dy)


exit_head.defvjp(_fwd, _bwd)
