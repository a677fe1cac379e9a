"""The direct convolution kernels of conv_kernels.cc as JAX operations (CPU only).

`forward(x, w, strides, padding)` is the NHWC x HWIO convolution,
`weight_grad` its gradient with respect to the kernel and `input_grad` the
one with respect to the input (any stride). They need float32 and channels
in multiples of `LANES` (output channels; input channels too for
`input_grad`); `supports` says whether a convolution qualifies. The kernels pad inside
(top and left padding are attributes; the output shape implies the rest).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_vision.cpu.native import build

LANES = 16  # output channels per vector register tile in the kernels
_TARGETS = {"forward": "av_conv_forward", "weight_grad": "av_conv_weight_grad",
            "input_grad": "av_conv_input_grad"}
KERNELS = build.Kernels("conv_kernels", tuple(_TARGETS.values()))
unavailable_reason = KERNELS.unavailable_reason  # None where the kernels can run, else why not
available = KERNELS.available


def supports(x_dtype, kernel_shape, padding=((0, 0), (0, 0))) -> bool:
  """Whether the kernels can run this convolution: float32, Cout % LANES == 0,
  padding from 0 to kernel size - 1 on every side."""
  pads_ok = all(0 <= p < k for (lo, hi), k in zip(padding, kernel_shape[:2]) for p in (lo, hi))
  return jnp.dtype(x_dtype) == jnp.float32 and kernel_shape[-1] % LANES == 0 and pads_ok


def _call(target: str, out_shape, a, b, strides, padding):
  KERNELS.register()
  (top, _), (left, _) = padding
  return jax.ffi.ffi_call(_TARGETS[target], jax.ShapeDtypeStruct(out_shape, jnp.float32),
                          vmap_method="sequential")(
      a, b, sh=np.int64(strides[0]), sw=np.int64(strides[1]), top=np.int64(top),
      left=np.int64(left))


def output_size(size: int, k: int, stride: int, pad: tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - k) // stride + 1


def forward(x, w, strides, padding):
  """NHWC x HWIO convolution with explicit ((top, bottom), (left, right)) padding."""
  ho = output_size(x.shape[1], w.shape[0], strides[0], padding[0])
  wo = output_size(x.shape[2], w.shape[1], strides[1], padding[1])
  return _call("forward", (x.shape[0], ho, wo, w.shape[3]), x, w, strides, padding)


def weight_grad(x, dy, kernel_shape, strides, padding):
  """d(sum(forward(x, w) * dy)) / dw, of shape `kernel_shape` (HWIO)."""
  return _call("weight_grad", tuple(kernel_shape), x, dy, strides, padding)


def input_grad(dy, w, x_shape, strides, padding):
  """d(sum(forward(x, w) * dy)) / dx for x of `x_shape`, any stride. Needs
  x_shape[-1] % LANES == 0."""
  return _call("input_grad", tuple(x_shape), dy, jnp.swapaxes(w, 2, 3), strides, padding)
