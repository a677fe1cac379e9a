"""One early exit's decision in the single-dispatch cascade (decide_kernels.cc)
as a JAX operation, for the CPU.

`decide(logits, state, threshold, exit=k, last=..., criterion=...)` returns
`(new_state, undecided)`, equal to `adaptive_vision.inference.decide_xla`: rows of `state` [B, K + 1]
(the logits of the exit taken, then its index; -1 while undecided) that are
still undecided take `logits` [B, K] and the index k where the criterion
fires ('entropy': softmax entropy < threshold; 'max_prob': largest softmax
probability > threshold) or where k is the last exit; `undecided` (a bool
scalar) says whether a row is left for the next segment. float32 only.
Inference only: it has no gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from adaptive_vision.cpu.native import build

_CRITERIA = {"entropy": 0, "max_prob": 1}
KERNELS = build.Kernels("decide_kernels", ("av_exit_decide",))
unavailable_reason = KERNELS.unavailable_reason  # None where the kernels can run, else why not
available = KERNELS.available


def decide(logits, state, threshold, *, exit: int, last: bool, criterion: str):
  if criterion not in _CRITERIA:
    raise ValueError(f"unknown exit criterion {criterion!r}; valid: {tuple(_CRITERIA)}")
  KERNELS.register()
  out = (jax.ShapeDtypeStruct(state.shape, jnp.float32), jax.ShapeDtypeStruct((), jnp.bool_))
  return jax.ffi.ffi_call("av_exit_decide", out, vmap_method="sequential")(
      logits, state, jnp.reshape(threshold, (1,)).astype(jnp.float32),
      exit=np.int64(exit), last=bool(last), criterion=np.int64(_CRITERIA[criterion]))
