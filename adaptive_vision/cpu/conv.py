"""2-D convolution whose backward passes are matrix products on CPU.

XLA:CPU runs a convolution's forward pass through a fast GEMM-based kernel,
but the two convolutions of its backward pass (input and weight gradients)
take a slow generic path: for a 3x3, 16->16 channel convolution at 32x32 and
batch 128 the backward cost ~20x the forward (results/bench_notes.md). Here the
backward is written by hand:

* weight gradient: one GEMM over the whole batch, im2col(x)^T @ dy, where
  im2col is kh*kw strided slices of the padded input (no convolution op);
* input gradient, stride 1: a forward-style convolution of dy with the
  flipped, in/out-transposed kernel (the fast path again);
* input gradient, stride > 1: dy @ W^T gives each tap's contribution, placed
  back with interior padding and summed (col2im).

`conv2d(x, w, strides, padding)` equals `lax.conv_general_dilated` on NHWC /
HWIO in value and in gradient (tests/test_conv.py).

`native_conv2d` goes further on CPU: forward, weight gradient and (stride 1)
input gradient are direct convolution kernels written in C++ and called
through XLA's FFI (adaptive_vision/cpu/native), built for the machine on first
use. It covers float32 convolutions with output channels in multiples of 16;
others take the GEMM path.

`GemmConv` and `NativeConv` are drop-ins for the ResNets' `nn.Conv` (same
parameter names, shapes and initialization, so checkpoints restore either
way), chosen by `adaptive_vision.cpu.layers`: 'native' when the kernels build
and the program runs on one device (a custom call is not split across
devices), else 'gemm'.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from adaptive_vision.cpu.native import conv as native_conv

_DIMS = ("NHWC", "HWIO", "NHWC")


def _xla_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_DIMS)


def _out_size(size: int, k: int, s: int, pad: tuple[int, int]) -> int:
  return (size + pad[0] + pad[1] - k) // s + 1


def _patches(x, kh: int, kw: int, strides, padding, ho: int, wo: int):
  """im2col by slicing: [B, Ho, Wo, kh*kw*C], taps in HWI order."""
  sh, sw = strides
  xp = jnp.pad(x, ((0, 0), padding[0], padding[1], (0, 0)))
  taps = [xp[:, i:i + sh * (ho - 1) + 1:sh, j:j + sw * (wo - 1) + 1:sw, :]
          for i in range(kh) for j in range(kw)]
  return jnp.concatenate(taps, axis=-1) if len(taps) > 1 else taps[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d(x, w, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]):
  """NHWC x HWIO convolution with explicit padding ((top, bottom), (left, right))."""
  return _xla_conv(x, w, strides, padding)


def _conv2d_fwd(x, w, strides, padding):
  return _xla_conv(x, w, strides, padding), (x, w)


# Working-set size of one chunk of im2col patches in the backward pass. Small
# chunks stay in cache and below glibc's mmap threshold (32 MiB): a fresh
# mmap'd buffer costs page faults on every step, which made the whole-batch
# im2col 3-4x slower than the same work in chunks (results/bench_notes.md).
_CHUNK_BYTES = 2 << 20


def _batch_chunk(batch: int, bytes_per_image: int) -> int:
  """The largest divisor of `batch` whose patches fit in _CHUNK_BYTES (>= 1)."""
  best = 1
  for c in range(1, batch + 1):
    if batch % c == 0 and c * bytes_per_image <= _CHUNK_BYTES:
      best = c
  return best


def _col2im(dcols, hp: int, wp: int, kh: int, kw: int, strides):
  """Sums each tap's [B, Ho, Wo, C] contribution back onto the padded input grid."""
  sh, sw = strides
  ho, wo = dcols.shape[1], dcols.shape[2]
  zero = jnp.zeros((), dcols.dtype)
  out = None
  for t in range(kh * kw):
    i, j = divmod(t, kw)
    placed = lax.pad(dcols[:, :, :, t], zero,
                     ((0, 0, 0), (i, hp - i - sh * (ho - 1) - 1, sh - 1),
                      (j, wp - j - sw * (wo - 1) - 1, sw - 1), (0, 0, 0)))
    out = placed if out is None else out + placed
  return out


def _conv2d_bwd(strides, padding, res, dy):
  x, w = res
  kh, kw, cin, cout = w.shape
  b, h, wd, _ = x.shape
  ho, wo = dy.shape[1], dy.shape[2]
  hp, wp = h + sum(padding[0]), wd + sum(padding[1])
  k = kh * kw * cin
  w2 = w.reshape(k, cout)
  f32 = jnp.float32
  strided = strides != (1, 1)

  if (kh, kw) == (1, 1) and not strided and padding == ((0, 0), (0, 0)):
    dw = jnp.dot(x.reshape(-1, cin).T, dy.reshape(-1, cout), preferred_element_type=f32)
    dx = jnp.dot(dy, w2.T.astype(dy.dtype))
    return dx.astype(x.dtype), dw.astype(w.dtype).reshape(w.shape)

  # Weight gradient: im2col(x)^T @ dy, accumulated over chunks of the batch
  # (for strided convolutions the input gradient is built in the same chunks).
  chunk = _batch_chunk(b, ho * wo * k * x.dtype.itemsize)
  xs = x.reshape(b // chunk, chunk, h, wd, cin)
  dys = dy.reshape(b // chunk, chunk, ho, wo, cout)

  def body(acc, xd):
    xc, dc = xd
    cols = _patches(xc, kh, kw, strides, padding, ho, wo).reshape(-1, k)
    acc = acc + jnp.dot(cols.T, dc.reshape(-1, cout), preferred_element_type=f32)
    if not strided:
      return acc, None
    dcols = jnp.dot(dc, w2.T.astype(dc.dtype)).reshape(chunk, ho, wo, kh * kw, cin)
    dxp = _col2im(dcols, hp, wp, kh, kw, strides)
    return acc, dxp[:, padding[0][0]:padding[0][0] + h, padding[1][0]:padding[1][0] + wd]

  dw, dxs = lax.scan(body, jnp.zeros((k, cout), f32), (xs, dys))
  dw = dw.astype(w.dtype).reshape(w.shape)
  if strided:
    return dxs.reshape(x.shape).astype(x.dtype), dw
  # Stride 1: the transposed convolution is a forward convolution of dy with
  # the flipped, in/out-swapped kernel, padded so every input pixel is reached.
  wt = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  pad = ((kh - 1 - padding[0][0], h - ho + padding[0][0]),
         (kw - 1 - padding[1][0], wd - wo + padding[1][0]))
  return _xla_conv(dy, wt, (1, 1), pad).astype(x.dtype), dw


conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def native_conv2d(x, w, strides: tuple[int, int], padding: tuple[tuple[int, int], ...]):
  """`conv2d` through the native CPU kernels; needs `native_supports(...)`."""
  return native_conv.forward(x, w, strides, padding)


def _native_fwd(x, w, strides, padding):
  return native_conv.forward(x, w, strides, padding), (x, w)


def _native_bwd(strides, padding, res, dy):
  x, w = res
  kh, kw, cin, cout = w.shape
  dw = native_conv.weight_grad(x, dy, w.shape, strides, padding)
  if cin % native_conv.LANES:
    # Few input channels (the stem, whose input gradient is usually dead code).
    return jax.vjp(lambda x: _xla_conv(x, w, strides, padding), x)[1](dy)[0], dw
  if strides == (1, 1):
    # The transposed convolution is a forward one of dy with the flipped,
    # in/out-swapped kernel (as in _conv2d_bwd); the forward kernel is a
    # little faster than the scattering one at 8x8x64 (results/bench_notes.md).
    wt = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
    pad = ((kh - 1 - padding[0][0], x.shape[1] - dy.shape[1] + padding[0][0]),
           (kw - 1 - padding[1][0], x.shape[2] - dy.shape[2] + padding[1][0]))
    if native_conv.supports(dy.dtype, wt.shape, pad):
      return native_conv.forward(dy, wt, (1, 1), pad), dw
  return native_conv.input_grad(dy, w, x.shape, strides, padding), dw


native_conv2d.defvjp(_native_fwd, _native_bwd)


def native_supports(x_dtype, kernel_shape, strides, padding) -> bool:
  """Whether native_conv2d runs this convolution (1x1 stride-1 ones are plain
  matrix products, which the GEMM path already hands to the dot library)."""
  pointwise = tuple(kernel_shape[:2]) == (1, 1) and tuple(strides) == (1, 1)
  return native_conv.supports(x_dtype, kernel_shape, padding) and not pointwise


def _explicit_padding(padding, kernel_size, strides, in_shape):
  if isinstance(padding, str):
    if padding == "VALID":
      return ((0, 0), (0, 0))
    if padding == "SAME":
      pads = []
      for size, k, s in zip(in_shape, kernel_size, strides):
        out = -(-size // s)
        total = max((out - 1) * s + k - size, 0)
        pads.append((total // 2, total - total // 2))
      return tuple(pads)
    raise ValueError(f"padding {padding!r}; use 'SAME', 'VALID' or explicit pairs")
  return tuple((int(lo), int(hi)) for lo, hi in padding)


class GemmConv(nn.Module):
  """`nn.Conv` for NHWC images (2-D, no dilation, no groups), with the same
  parameters ('kernel' [kh, kw, Cin, Cout], optional 'bias') and defaults,
  whose backward passes are matrix products (`conv2d`)."""
  features: int
  kernel_size: Sequence[int]
  strides: Sequence[int] = (1, 1)
  padding: Any = "SAME"
  use_bias: bool = True
  dtype: Any = None
  kernel_init: Any = nn.initializers.lecun_normal()
  bias_init: Any = nn.initializers.zeros

  def convolve(self, x, kernel, strides, padding):
    return conv2d(x, kernel, strides, padding)

  @nn.compact
  def __call__(self, x):
    if x.ndim != 4:
      raise ValueError(f"{type(self).__name__} expects NHWC images, got shape {x.shape}")
    kh, kw = tuple(self.kernel_size)
    strides = (self.strides,) * 2 if isinstance(self.strides, int) else tuple(self.strides)
    padding = _explicit_padding(self.padding, (kh, kw), strides, x.shape[1:3])
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features))
    dtype = self.dtype or x.dtype
    x, kernel = x.astype(dtype), kernel.astype(dtype)
    y = self.convolve(x, kernel, strides, padding)
    if self.use_bias:
      y = y + self.param("bias", self.bias_init, (self.features,)).astype(dtype)
    return y


class NativeConv(GemmConv):
  """`GemmConv` through the native kernels where they cover the convolution
  (`native_supports`), the GEMM path elsewhere."""

  def convolve(self, x, kernel, strides, padding):
    if native_supports(x.dtype, kernel.shape, strides, padding):
      return native_conv2d(x, kernel, strides, padding)
    return conv2d(x, kernel, strides, padding)
