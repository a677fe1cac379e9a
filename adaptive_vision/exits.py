"""What every early-exit family produces, and what the losses and exit policies read.

A model's exit logits are a tuple of [B, K] arrays, cheapest exit first (one
exit: a tuple of one). `as_exits` is the one function that normalises the
other accepted forms; the losses (`adaptive_vision.losses`) and the exit
policies (`adaptive_vision.early_exit`) take exit logits through it, so they
depend on this contract, not on the models.
"""

from __future__ import annotations

from typing import Any


def as_exits(logits: Any) -> tuple:
  """Tuple of [B, K] exit logits from a sequence of them, one [B, K] array
  (one exit) or a stacked [E, B, K] array.

  The one place that normalises exit logits: the losses and the early-exit
  policies accept any of these forms through it.
  """
  if isinstance(logits, (tuple, list)):
    return tuple(logits)
  ndim = getattr(logits, "ndim", None)
  if ndim == 2:
    return (logits,)
  if ndim == 3:
    return tuple(logits[i] for i in range(logits.shape[0]))
  raise ValueError(f"expected [B, K] logits, [E, B, K] stacked exit logits or a "
                   f"sequence of [B, K], got {type(logits).__name__} "
                   f"of shape {getattr(logits, 'shape', None)}")
