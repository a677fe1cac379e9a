"""Analytic compute counts.

MACs count the multiply-accumulates of dense layers, convolutions and the two
attention products (QK^T and AV); FLOPs = 2 * MACs. Normalizations,
activations and softmax are left out: for the models here they are ~1% of the
total, which is why the analytic counts agree with XLA's cost analysis (which
counts everything) to within 2%.
"""

from __future__ import annotations


def dense_macs(tokens: int, d_in: int, d_out: int) -> float:
  return float(tokens) * d_in * d_out


def conv_macs(h_out: int, w_out: int, kernel: int, c_in: int, c_out: int,
              groups: int = 1) -> float:
  return float(h_out) * w_out * kernel * kernel * (c_in // groups) * c_out


def attention_macs(tokens: int, width: int) -> float:
  """QK^T and AV for all heads together (head count does not change it)."""
  return 2.0 * tokens * tokens * width


def vit_block_macs(tokens: int, width: int, mlp_dim: int) -> float:
  return (dense_macs(tokens, width, 3 * width)      # qkv
          + attention_macs(tokens, width)
          + dense_macs(tokens, width, width)        # output projection
          + dense_macs(tokens, width, mlp_dim)
          + dense_macs(tokens, mlp_dim, width))


def vit_macs(*, image_size: int, patch_size: int, width: int, depth: int,
             mlp_dim: int, num_classes: int, cls_token: bool = True,
             head: bool = True) -> float:
  """MACs of one forward pass of a ViT on one image."""
  patches = (image_size // patch_size) ** 2
  tokens = patches + (1 if cls_token else 0)
  embed = dense_macs(patches, patch_size * patch_size * 3, width)
  head_macs = dense_macs(1, width, num_classes) if head else 0.0
  return embed + depth * vit_block_macs(tokens, width, mlp_dim) + head_macs


def macs_to_flops(macs: float) -> float:
  return 2.0 * macs


def xla_flops(fn, *args) -> float:
  """FLOPs XLA counts for `fn(*args)` once compiled (for cross-checks)."""
  import jax  # local: keep this module importable without initialising a backend
  compiled = jax.jit(fn).lower(*args).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):  # older jax returns one dict per device
    analysis = analysis[0]
  return float(analysis["flops"])


# ----------------------------------------------------------------------------
# Convolution counts with padding (added for the CNN families).
#
# `conv_macs` counts every kernel tap of every output position, padded ones
# included: the convention of the published CNN numbers (ResNet-20: 40.8M).
# XLA's cost analysis counts only the taps that land inside the input, so a
# 3x3 'SAME' convolution on an 8x8 map reads (22/24)^2 = 84% of the taps that
# `conv_macs` counts. `conv_valid_macs` reproduces XLA's convention, for
# cross-checks.


def conv_out_size(size: int, kernel: int, stride: int, pad_lo: int, pad_hi: int) -> int:
  return (size + pad_lo + pad_hi - kernel) // stride + 1


def conv_valid_taps(size: int, kernel: int, stride: int, pad_lo: int, pad_hi: int) -> int:
  """(output position, kernel tap) pairs along one dimension that read the input."""
  out = conv_out_size(size, kernel, stride, pad_lo, pad_hi)
  return sum(1 for o in range(out) for k in range(kernel)
             if 0 <= o * stride - pad_lo + k < size)


def conv_valid_macs(h_in: int, w_in: int, kernel: int, stride: int, pad: int,
                    c_in: int, c_out: int, groups: int = 1) -> float:
  """MACs of a convolution with symmetric padding `pad`, padded taps excluded."""
  return (float(conv_valid_taps(h_in, kernel, stride, pad, pad))
          * conv_valid_taps(w_in, kernel, stride, pad, pad) * (c_in // groups) * c_out)
