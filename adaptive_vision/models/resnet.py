"""CIFAR ResNets (He et al. 2016, section 4.2) with ERDE early exits.

The 3-stage family: depth = 6n + 2 (ResNet-8/14/20/32/44/56/110), a 3x3 conv
stem with BatchNorm and ReLU, then 3 stages of n basic blocks with 16, 32, 64
channels (times `width / 16 * width_multiplier`) and strides 1, 2, 2, then
global average pooling and a Dense layer (the final exit).

Shortcuts: identity where the shape is kept, otherwise option B of the paper,
a 1x1 convolution (with the block's stride) + BatchNorm projection. The
published parameter counts (ResNet-20: 0.27M, ResNet-56: 0.85M) use option A
(zero-padded identity, no parameters); option B adds 2 projections, i.e.
~2.8K parameters and ~0.26M MACs at width 16 (1% and 0.6% of ResNet-20).

Early exits: `exits` lists 0-based indices of residual blocks (over all 3n
blocks) after which an `ExitHead` (BN, ReLU, 2x2 avg-pool, dropout 0.5,
Dense) is attached; e.g. `(2, 5)` for ResNet-20 = after stages 1 and 2 (see
`stage_exits`). The final classifier is always the last exit.

    (exit_logits, out) = ResNet(depth=20, exits=(2, 5)).apply(
        variables, images, train=False)

`exit_logits` is a tuple (early exits in order, then the final head) of
float32 [B, K]; `out = dict(blocks=<per-block outputs>, pre_logits=<pooled
features>)`.

BatchNorm everywhere: `use_running_average=not train`, momentum 0.9,
epsilon 1e-5, statistics in the 'batch_stats' collection (apply with
`mutable=['batch_stats']` in training).
"""

from __future__ import annotations

import functools
import numbers
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from adaptive_vision import flops
from adaptive_vision.models import module_kwargs, one_image_input
from adaptive_vision.models.exit_heads import ExitHead, check_exits, exit_head_macs
from adaptive_vision.models.layers import PLAIN, Layers

STANDARD_DEPTHS = (8, 14, 20, 32, 44, 56, 110)
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# He et al. initialisation (fan-in, ReLU gain) for the convolutions.
_CONV_INIT = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


def blocks_per_stage(depth: int) -> int:
  """n for depth = 6n + 2."""
  if (isinstance(depth, bool) or not isinstance(depth, numbers.Integral)
      or depth < 8 or (depth - 2) % 6):
    raise ValueError(f"CIFAR ResNet depth must be 6n+2 with n >= 1, e.g. "
                     f"{STANDARD_DEPTHS}; got {depth!r}")
  return (int(depth) - 2) // 6


def stage_widths(width: int = 16, width_multiplier: float = 1.0) -> tuple[int, int, int]:
  """Channels of the 3 stages: (1, 2, 4) * width * width_multiplier, rounded."""
  if width <= 0 or width_multiplier <= 0:
    raise ValueError(f"ResNet width {width} and width_multiplier {width_multiplier} "
                     "must be positive")
  return tuple(max(1, int(round(width * width_multiplier * 2 ** s))) for s in range(3))


def stage_exits(depth: int, stages: Sequence[int] = (1, 2)) -> tuple[int, ...]:
  """Exit indices after the given stages (1-based; the last stage is the final head).

  `stage_exits(20) == (2, 5)`: exits after stage 1 and stage 2 of ResNet-20.
  """
  n = blocks_per_stage(depth)
  return tuple(s * n - 1 for s in stages)


def _block_strides(n: int) -> list[int]:
  return [2 if i % n == 0 and i > 0 else 1 for i in range(3 * n)]


class BasicBlock(nn.Module):
  """3x3 conv-BN-ReLU-3x3 conv-BN, plus shortcut, then ReLU.

  The shortcut is the identity when stride is 1 and channels are kept,
  otherwise (option B) a strided 1x1 convolution + BatchNorm.
  """
  filters: int
  strides: int = 1
  dtype: Any = jnp.float32
  layers: Layers = PLAIN

  @nn.compact
  def __call__(self, x, *, train: bool):
    conv = functools.partial(self.layers.conv, use_bias=False, dtype=self.dtype,
                             kernel_init=_CONV_INIT)
    # No axis_name: under jit with the batch sharded over a mesh, the batch
    # mean/variance are global reductions, so the statistics are already
    # averaged across devices.
    norm = functools.partial(self.layers.batch_norm, use_running_average=not train,
                             momentum=BN_MOMENTUM, epsilon=BN_EPSILON, dtype=self.dtype)
    s = (self.strides, self.strides)
    # Explicit padding 1 (as the PyTorch reference implementations) rather
    # than 'SAME', which pads (0, 1) for stride 2 on even sizes.
    y = conv(self.filters, (3, 3), strides=s, padding=((1, 1), (1, 1)), name="conv1")(x)
    y = norm(name="norm1")(y, relu=True)
    y = conv(self.filters, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
    if self.strides != 1 or x.shape[-1] != self.filters:
      x = conv(self.filters, (1, 1), strides=s, padding="VALID", name="proj_conv")(x)
      x = norm(name="proj_norm")(x)
    # relu(shortcut + BN(y)), in one pass where the norm implementation allows.
    return norm(name="norm2")(y, residual=x, relu=True)


class ResNet(nn.Module):
  """CIFAR ResNet-(6n+2) with early exits; see the module docstring.

  Besides `__call__` (every exit at once), `segment(k, images, carry)` runs
  only what exit k adds to exit k-1 (the stem first, for k = 0), so an
  early-exit executor can stop after any exit (`adaptive_vision.inference`).
  Both use the same submodules, so parameter names are the same either way.
  """
  depth: int = 20
  width: int = 16
  width_multiplier: float = 1.0
  num_classes: int = 10
  exits: Sequence[int] = ()
  exit_dropout: float = 0.5
  dtype: Any = jnp.float32       # compute dtype; parameters stay float32
  layers: Layers = PLAIN         # models.layers: plain flax, or a backend's kernels

  @property
  def num_blocks(self) -> int:
    return 3 * blocks_per_stage(self.depth)

  @property
  def num_exits(self) -> int:
    return len(check_exits(self.exits, self.num_blocks, f"ResNet-{self.depth}")) + 1

  def setup(self):
    n = blocks_per_stage(self.depth)
    self.exit_blocks = check_exits(self.exits, 3 * n, f"ResNet-{self.depth}")
    widths = stage_widths(self.width, self.width_multiplier)
    self.stem_conv = self.layers.conv(widths[0], (3, 3), padding=((1, 1), (1, 1)),
                                      use_bias=False, dtype=self.dtype, kernel_init=_CONV_INIT)
    # Cross-device statistics: see BasicBlock.
    self.stem_norm = self.layers.batch_norm(momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                                            dtype=self.dtype)
    self.blocks = [BasicBlock(widths[i // n], stride, dtype=self.dtype, layers=self.layers,
                              name=f"block{i}")
                   for i, stride in enumerate(_block_strides(n))]
    self.exit_heads = [ExitHead(self.num_classes, self.exit_dropout, momentum=BN_MOMENTUM,
                                epsilon=BN_EPSILON, dtype=self.dtype, layers=self.layers,
                                name=f"exit_block{i}")
                       for i in self.exit_blocks]
    self.head = nn.Dense(self.num_classes)

  def _stem(self, images, train: bool):
    x = self.stem_conv(images.astype(self.dtype))
    return self.stem_norm(x, use_running_average=not train, relu=True)

  def _final(self, x):
    pre_logits = x.astype(jnp.float32).mean(axis=(1, 2))
    return self.head(pre_logits), pre_logits

  def segment(self, k: int, images, carry=None, *, train: bool = False):
    """Exit k's share of the network: returns `(logits_k [B, K], carry)`.

    k = 0 runs the stem and the blocks up to the first exit on `images`;
    k > 0 continues from `carry` (the feature map segment k-1 returned;
    `images` is not read). Chaining k = 0, 1, ... gives the logits of
    `__call__`.
    """
    bounds = (-1,) + tuple(self.exit_blocks) + (self.num_blocks - 1,)
    if not isinstance(k, int) or not 0 <= k < len(bounds) - 1:
      raise ValueError(f"ResNet segment index must be an int in [0, {len(bounds) - 1}), "
                       f"got {k!r}")
    x = self._stem(images, train) if k == 0 else carry
    for i in range(bounds[k] + 1, bounds[k + 1] + 1):
      x = self.blocks[i](x, train=train)
    if k < len(self.exit_blocks):
      return self.exit_heads[k](x, train=train), x
    return self._final(x)[0], x

  def __call__(self, images, *, train: bool = False):
    x = self._stem(images, train)
    blocks, exit_logits = [], []
    for i, block in enumerate(self.blocks):
      x = block(x, train=train)
      blocks.append(x)
      if i in self.exit_blocks:
        head = self.exit_heads[self.exit_blocks.index(i)]
        exit_logits.append(head(x, train=train))
    logits, pre_logits = self._final(x)
    return tuple(exit_logits) + (logits,), {"blocks": tuple(blocks), "pre_logits": pre_logits}


# ----------------------------------------------------------------------------
# Analytic MACs


def macs_breakdown(*, image_size: int, depth: int = 20, width: int = 16,
                   width_multiplier: float = 1.0, num_classes: int = 10,
                   exits: Sequence[int] = (), count_padding: bool = True) -> dict:
  """MACs per image of each part: stem, blocks (list), exit_heads (list), head.

  Convolutions count kernel taps x output positions x channels; with
  `count_padding=True` (the published convention) taps over the zero padding
  count too; with False only the taps that read the input count, which is
  what XLA's cost analysis counts (for cross-checks).
  """
  n = blocks_per_stage(depth)
  exits = check_exits(exits, 3 * n, f"ResNet-{depth}")
  widths = stage_widths(width, width_multiplier)

  def conv(h, w, k, s, p, cin, cout):
    ho, wo = (flops.conv_out_size(h, k, s, p, p), flops.conv_out_size(w, k, s, p, p))
    if count_padding:
      return flops.conv_macs(ho, wo, k, cin, cout), ho, wo
    return flops.conv_valid_macs(h, w, k, s, p, cin, cout), ho, wo

  h = w = image_size
  stem, h, w = conv(h, w, 3, 1, 1, 3, widths[0])
  c = widths[0]
  blocks, heads = [], []
  for i, stride in enumerate(_block_strides(n)):
    cout = widths[i // n]
    m1, ho, wo = conv(h, w, 3, stride, 1, c, cout)
    m2, _, _ = conv(ho, wo, 3, 1, 1, cout, cout)
    proj = conv(h, w, 1, stride, 0, c, cout)[0] if (stride != 1 or c != cout) else 0.0
    blocks.append(m1 + m2 + proj)
    h, w, c = ho, wo, cout
    if i in exits:
      heads.append(exit_head_macs(h, w, c, num_classes))
  return {"stem": stem, "blocks": blocks, "exit_heads": heads,
          "head": flops.dense_macs(1, c, num_classes)}


def cumulative_exit_macs(breakdown: dict, exits: Sequence[int]) -> list[float]:
  """Cumulative MACs to reach and evaluate each exit (see `exit_macs`)."""
  result, spent, done = [], breakdown["stem"], 0
  for e, head in zip(exits, breakdown["exit_heads"]):
    spent += sum(breakdown["blocks"][done:e + 1])
    done = e + 1
    spent += head          # earlier heads stay in the cost of later exits
    result.append(spent)
  spent += sum(breakdown["blocks"][done:]) + breakdown["head"]
  return result + [spent]


# ----------------------------------------------------------------------------
# Model-family contract (see adaptive_vision/models/__init__.py)

def _kwargs(model_cfg) -> dict:
  return module_kwargs(model_cfg, ResNet)


def build(model_cfg) -> ResNet:
  kw = _kwargs(model_cfg)
  resnet = ResNet(**kw)
  n = blocks_per_stage(resnet.depth)
  stage_widths(resnet.width, resnet.width_multiplier)
  # Validate here (not only at trace time) and store a hashable tuple.
  return resnet.clone(exits=check_exits(resnet.exits, 3 * n, f"ResNet-{resnet.depth}"))


input_sizes = one_image_input  # one image batch of model.image_size


def exit_macs(model_cfg) -> list[float]:
  """Cumulative MACs per image to reach and evaluate each exit.

  Exit j costs the stem, the blocks up to its block and the heads of exits
  0..j: a real early-exit inference that evaluates exit j has also evaluated
  the earlier exits' heads (to test their confidence), so their MACs are
  spent. The final exit = whole backbone + final Dense + all early heads.
  Padded convolution taps count (the published convention: ResNet-20 at
  32x32 ~ 41M).
  """
  resnet = build(model_cfg)
  if "image_size" not in model_cfg:
    raise ValueError("ResNet exit_macs needs model.image_size (the input resolution)")
  b = macs_breakdown(image_size=model_cfg.image_size, depth=resnet.depth,
                     width=resnet.width, width_multiplier=resnet.width_multiplier,
                     num_classes=resnet.num_classes, exits=resnet.exits)
  return cumulative_exit_macs(b, resnet.exits)
