"""ViT with early exits after chosen blocks.

`EarlyExitViT` is the `ViT` of `adaptive_vision.models.vit` (same fields,
same parameter names, so a ViT checkpoint's params load as they are) plus
`exits`: 0-based indices of encoder blocks after which a `TokenExitHead`
(LayerNorm + Dense on the class token of that block's output) is attached.
The ViT's own head (encoder norm + Dense on the class token, or on the mean
of the patch tokens with pool='gap') is always the last exit.

    (exit_logits, out) = EarlyExitViT(num_classes=10, variant='Ti/4',
                                      exits=(3, 7)).apply(variables, images, train=False)

`exit_logits` is a tuple of float32 [B, K] (early exits in block order, then
the final head); `out` is the ViT's dict ('blocks', 'encoded', 'cls_token',
'pre_logits'). Exit head parameters are named `exit_block{i}`.
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn

from adaptive_vision import flops
from adaptive_vision.models import _check_image_size, module_kwargs, one_image_input
from adaptive_vision.models.exit_heads import TokenExitHead, check_exits, token_exit_head_macs
from adaptive_vision.models.vit import ViT


class EarlyExitViT(ViT):
  """`ViT` plus token exit heads after the blocks listed in `exits`.

  The encoder (embedding, blocks, final norm and head) is ViT.__call__ itself;
  the exit heads read `out['blocks'][i]`, so nothing of the block code is
  repeated here.
  """
  exits: Sequence[int] = ()

  @nn.compact
  def __call__(self, images, *, train: bool = False, cls_bias=None):
    exits = check_exits(self.exits, self.dims["depth"], "EarlyExitViT")
    logits, out = super().__call__(images, train=train, cls_bias=cls_bias)
    exit_logits = tuple(
        TokenExitHead(self.num_classes, zero_init=self.head_zero_init, dtype=self.dtype,
                      name=f"exit_block{i}")(out["blocks"][i])
        for i in exits)
    return exit_logits + (logits,), out


# ----------------------------------------------------------------------------
# Model-family contract (see adaptive_vision/models/__init__.py)

def _kwargs(model_cfg) -> dict:
  return module_kwargs(model_cfg, EarlyExitViT)


def build(model_cfg) -> EarlyExitViT:
  model = EarlyExitViT(**_kwargs(model_cfg))
  dims = model.dims
  if "image_size" in model_cfg:
    _check_image_size(model_cfg.image_size, dims["patch_size"], "model")
  # Validate here (not only at trace time) and store a hashable tuple.
  return model.clone(exits=check_exits(model.exits, dims["depth"], "EarlyExitViT"))


input_sizes = one_image_input  # one image batch of model.image_size


def exit_macs(model_cfg) -> list[float]:
  """Cumulative MACs per image to reach and evaluate each exit.

  Exit j costs the patch embedding, blocks 0..exits[j] and the heads of exits
  0..j (an early-exit inference evaluating exit j has evaluated the earlier
  heads too); the final exit = the whole ViT (with its head) + all early heads.
  """
  model = build(model_cfg)
  if "image_size" not in model_cfg:
    raise ValueError("EarlyExitViT exit_macs needs model.image_size")
  d = model.dims
  common = dict(image_size=model_cfg.image_size, patch_size=d["patch_size"],
                width=d["width"], mlp_dim=d["mlp_dim"], num_classes=model.num_classes)
  head = token_exit_head_macs(d["width"], model.num_classes)
  result = []
  for j, e in enumerate(model.exits):
    result.append(flops.vit_macs(depth=e + 1, head=False, **common) + (j + 1) * head)
  result.append(flops.vit_macs(depth=d["depth"], head=True, **common) + len(model.exits) * head)
  return result
