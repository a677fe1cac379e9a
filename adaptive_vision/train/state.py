"""The train state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any

import flax
import jax


@flax.struct.dataclass
class TrainState:
  step: jax.Array        # int32 scalar: number of updates applied
  params: Any
  opt_state: Any
  batch_stats: Any       # {} for models without BatchNorm
  rng: jax.Array         # base key; step keys are fold_in(rng, step)


def param_count(params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(params)))
