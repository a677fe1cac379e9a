"""XLA compiler options for our programs on CPU, per workload.

On CPU, XLA hands dots, reductions and convolutions to YNNPACK by default.
For the convolutions of the CIFAR ResNets XLA's own convolution is faster:
the 3x3 convolution at 16x16x32 and 8x8x64, batch 128, takes 3.5-3.9 ms
against 6.0-7.1 ms through YNNPACK on a Zen 4 EPYC, and the ERDE train steps
run 1.07-1.10x faster, paired (results/bench_notes.md); the ViT step is level.
So training programs keep YNNPACK for dots and reductions and leave
convolutions to XLA. Serving programs take the same options: at batch 1
(`python -m benchmarks.run latency`, which compiles every model both ways)
the ResNets compile to the same program either way on one CPU device (their
convolutions are native kernels), and the ViT and RAViT, whose one
convolution is the patch embedding, measured level or up to 4% slower with
XLA's defaults; no model kind wants other options at serve time.

`options(workload)` gives them as `jax.jit(compiler_options=...)` for one
program; `process.prepare` sets the same as XLA_FLAGS so that a user's own
`jax.jit` gets them too. Both first check once that this jaxlib knows the
option (its name is experimental; an unknown flag in XLA_FLAGS would abort
the process), in a child process whose answer is cached per jaxlib.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import pathlib
import subprocess
import sys
from typing import Optional

from adaptive_vision.cache_dir import cache_dir

YNN_FUSION_TYPE = "xla_cpu_experimental_ynn_fusion_type"
_NO_CONV = "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE"
# XLA's CPU default is the two above plus LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION.
XLA_DEFAULT_CPU_OPTIONS = {YNN_FUSION_TYPE: _NO_CONV + ",LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION"}

# workload -> options; None means XLA's defaults.
WORKLOAD_OPTIONS = {
    "train": {YNN_FUSION_TYPE: _NO_CONV},
    "serve": {YNN_FUSION_TYPE: _NO_CONV},
}


def _cache_file() -> pathlib.Path:
  import jaxlib
  return cache_dir("compiler", f"ynn-option-{jaxlib.__version__}.json")


_PROBE = ("import jax; jax.jit(lambda x: x + 1).lower(1.0).compile("
          "compiler_options={%r: %r})" % (YNN_FUSION_TYPE, _NO_CONV))


@functools.cache
def supported() -> bool:
  """Whether this jaxlib knows the option (probed once per jaxlib, cached)."""
  path = _cache_file()
  try:
    return bool(json.loads(path.read_text())["supported"])
  except (OSError, ValueError, KeyError):
    pass
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  try:
    done = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                          text=True, timeout=300)
    ok = done.returncode == 0
    why = done.stderr.strip().splitlines()[-1:] if not ok else []
  except (OSError, subprocess.SubprocessError) as e:
    ok, why = False, [str(e)]
  if not ok:
    logging.warning("XLA does not accept %s (%s); compiling with its defaults",
                    YNN_FUSION_TYPE, (why or ["?"])[0][:200])
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"supported": ok}))
    os.replace(tmp, path)
  except OSError:
    pass
  return ok


def options(workload: str = "train") -> Optional[dict]:
  """The compiler options of `workload` ('train' or 'serve'), or None (XLA's defaults)."""
  if workload not in WORKLOAD_OPTIONS:
    raise ValueError(f"workload {workload!r}; use one of {tuple(WORKLOAD_OPTIONS)}")
  chosen = WORKLOAD_OPTIONS[workload]
  if chosen is None or not supported():
    return None
  return dict(chosen)


def xla_flags(workload: str = "train") -> list[str]:
  """`options(workload)` as XLA_FLAGS entries."""
  return [f"--{k}={v}" for k, v in (options(workload) or {}).items()]
