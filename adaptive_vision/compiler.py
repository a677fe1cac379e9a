"""XLA compiler options for the library's compiled programs (`compiler.jit`).

On CPU, XLA hands dots, reductions and convolutions to YNNPACK by default.
For the convolutions of the CIFAR ResNets XLA's own convolution is faster:
the 3x3 convolution at 16x16x32 and 8x8x64, batch 128, takes 3.5-3.9 ms
against 6.0-7.1 ms through YNNPACK on a Zen 4 EPYC, and the ERDE train steps
run 1.07-1.10x faster, paired (results/bench_notes.md); the ViT step is level.
So on CPU our programs keep YNNPACK for dots and reductions and leave
convolutions to XLA. Elsewhere nothing is set.

`options()` probes once that this jaxlib knows the option (its name is
experimental) and falls back to XLA's defaults with a warning if not.
This module imports jax only when called, so that benchmarks can name the
options before they set XLA_FLAGS.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
# XLA's CPU default is these two plus LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
CPU_OPTIONS = {YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"}
# XLA's own default, for benchmarks that compare against it.
XLA_DEFAULT_CPU_OPTIONS = {
    YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE,"
                     "LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}


@functools.cache
def options(backend: Optional[str] = None) -> Optional[dict]:
  """The compiler options for programs on `backend` (default: jax's), or None."""
  import jax
  if (backend or jax.default_backend()) != "cpu":
    return None
  try:
    jax.jit(lambda x: x + 1).lower(1.0).compile(compiler_options=dict(CPU_OPTIONS))
  except Exception as e:  # an older or newer jaxlib without the option
    logging.warning("XLA does not accept %s (%s); compiling with its defaults",
                    YNN_FUSION_TYPE, str(e).splitlines()[0][:200])
    return None
  return dict(CPU_OPTIONS)


def jit(fn: Callable, **kwargs: Any):
  """`jax.jit(fn, **kwargs)` with this backend's `options()`."""
  import jax
  return jax.jit(fn, compiler_options=options(), **kwargs)
