"""Early-exit heads and the helpers shared by the early-exit families.

* `ExitHead`: the ERDE exit head for CNN feature maps (Guidez et al. 2025):
  BatchNorm -> ReLU -> 2x2 average pooling (stride 2) -> dropout -> flatten ->
  one Dense layer.
* `TokenExitHead`: the transformer counterpart: LayerNorm -> Dense on the
  class token.
* `exit_head_macs`, `token_exit_head_macs`: their analytic MACs (only the Dense
  layer: pooling, normalization and activations are not multiply-accumulates).
* `check_exits`: validation of an `exits` tuple (block indices after which a
  head is attached) with clear error messages.
"""

from __future__ import annotations

import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from adaptive_vision import flops
from adaptive_vision.models.layers import PLAIN, Layers


def _pool_window(size: int) -> int:
  """2 where the dimension can be pooled, 1 (no pooling) for a 1-pixel dimension."""
  return 2 if size >= 2 else 1


def pooled_size(size: int) -> int:
  """Spatial size after the exit head's pooling.

  2x2 windows with stride 2 and no padding ('VALID'), i.e. floor(size / 2) as
  PyTorch's `AvgPool2d(2)` does: an odd-sized map drops its last row/column.
  A dimension of size 1 is not pooled (window 1), so a 1x1 map goes straight
  to the Dense layer instead of vanishing.
  """
  return size // 2 if size >= 2 else size


class _DenseVariables(nn.Module):
  """The variables of `nn.Dense(features)` on `n_in` inputs (same names,
  shapes and initializers), returned instead of applied."""
  features: int

  @nn.compact
  def __call__(self, n_in: int):
    kernel = self.param("kernel", nn.initializers.lecun_normal(), (n_in, self.features),
                        jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    return kernel, bias


class ExitHead(nn.Module):
  """ERDE exit head on an NHWC feature map; returns float32 logits [B, K].

  BatchNorm follows the backbone's convention (running averages in
  'batch_stats', momentum 0.9, `use_running_average=not train`, no axis_name:
  under jit with a sharded batch the batch mean is already a global
  reduction). Pooling: see `pooled_size` (2x2/stride 2 'VALID'; 1-pixel
  dimensions are left as they are). Its variables are those of
  BatchNorm -> nn.Dense ('norm', 'dense').

  At inference, where `layers.exit_head_kernel` is given (a backend's fused
  kernel, e.g. the CPU's: at batch 1 XLA:CPU spends tens of microseconds on
  these small ops, which every early exit pays), the whole head runs as that
  one call, BatchNorm folded into a scale and shift; float32 only. Training
  always takes the layers' ops (dropout sits between).
  """
  num_classes: int
  dropout: float = 0.5
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32
  layers: Layers = PLAIN

  @nn.compact
  def __call__(self, x, *, train: bool):
    if x.ndim != 4:
      raise ValueError(f"ExitHead expects an NHWC feature map, got shape {x.shape}")
    window = (_pool_window(x.shape[1]), _pool_window(x.shape[2]))
    n_in = pooled_size(x.shape[1]) * pooled_size(x.shape[2]) * x.shape[3]
    fused = self.layers.exit_head_kernel
    if (fused is not None and not train and not self.is_initializing()
        and x.dtype == jnp.float32):
      stats, params = self.variables["batch_stats"]["norm"], self.variables["params"]
      a = params["norm"]["scale"].astype(jnp.float32) * jax.lax.rsqrt(stats["var"] + self.epsilon)
      shift = params["norm"]["bias"].astype(jnp.float32) - stats["mean"] * a
      return fused(x, a, shift, params["dense"]["kernel"], params["dense"]["bias"], window)
    x = self.layers.batch_norm(use_running_average=not train, momentum=self.momentum,
                               epsilon=self.epsilon, dtype=self.dtype, name="norm")(x, relu=True)
    kernel, bias = _DenseVariables(self.num_classes, name="dense")(n_in)
    if window != (1, 1):
      x = nn.avg_pool(x, window, strides=window, padding="VALID")
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    return jnp.dot(x.reshape(x.shape[0], -1).astype(jnp.float32), kernel) + bias


class TokenExitHead(nn.Module):
  """Transformer exit head: LayerNorm + Dense on the class token.

  Takes the tokens [B, N, D] of a block (class token first) or the class
  token [B, D]; returns float32 logits [B, K].
  """
  num_classes: int
  zero_init: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    if x.ndim == 3:
      x = x[:, 0]
    x = nn.LayerNorm(dtype=self.dtype, name="norm")(x)
    init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
    return nn.Dense(self.num_classes, kernel_init=init, name="dense")(x.astype(jnp.float32))


def exit_head_macs(h: int, w: int, c: int, num_classes: int) -> float:
  """MACs of `ExitHead` on an h x w x c map: the Dense layer after pooling.

  (h//2) * (w//2) * c * num_classes in the usual case; see `pooled_size` for
  odd and 1-pixel maps.
  """
  return flops.dense_macs(1, pooled_size(h) * pooled_size(w) * c, num_classes)


def token_exit_head_macs(width: int, num_classes: int) -> float:
  """MACs of `TokenExitHead` (one token through the Dense layer)."""
  return flops.dense_macs(1, width, num_classes)


def check_exits(exits: Sequence[int] | None, num_blocks: int, model: str = "model") -> tuple[int, ...]:
  """Validates early-exit block indices and returns them as a tuple of ints.

  `exits` are 0-based indices of the blocks after which an exit head is
  attached; the final classifier is always the last exit, so the last block
  (index num_blocks - 1) must not be listed. Indices must be strictly
  increasing and in [0, num_blocks - 1).
  """
  if exits is None:
    return ()
  if isinstance(exits, (str, bytes)) or not isinstance(exits, Sequence):
    raise ValueError(f"{model}: exits must be a sequence of block indices, got {exits!r}")
  out = []
  for e in exits:
    if isinstance(e, bool) or not isinstance(e, numbers.Integral):
      raise ValueError(f"{model}: exit indices must be integers, got {e!r} in {tuple(exits)!r}")
    out.append(int(e))
  for e in out:
    if e == num_blocks - 1:
      raise ValueError(
          f"{model}: exit {e} is the last block; the final classifier is always "
          f"the last exit, so list only blocks 0..{num_blocks - 2} in exits={tuple(out)}")
    if not 0 <= e < num_blocks - 1:
      raise ValueError(
          f"{model}: exit index {e} is out of range; the model has {num_blocks} "
          f"blocks, so early exits go after blocks 0..{num_blocks - 2} (exits={tuple(out)})")
  if any(b <= a for a, b in zip(out, out[1:])):
    raise ValueError(f"{model}: exits must be strictly increasing block indices, got {tuple(out)}")
  return tuple(out)
