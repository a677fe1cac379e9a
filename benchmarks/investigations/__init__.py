"""One-off investigations, kept runnable but off the benchmark's main path.

  python -m benchmarks.investigations.profile  per-op times of a train step
                                              (jax.profiler trace + HLO metadata)
  python -m benchmarks.investigations.micro    the ViT's matmuls and attention
                                              alone, JAX against PyTorch
  python -m benchmarks.investigations.conv     the ResNets' 3x3 convolutions alone,
                                              XLA's kernels against PyTorch's

Their findings are written up in results/bench_notes.md; the benchmark itself
is `python -m benchmarks.run` (docs/benchmarks.md).
"""

import time

import numpy as np


def median_ms(fn, reps: int = 20) -> float:
  """Median wall time of `fn()` in ms over `reps` calls, after one warm-up call."""
  fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))
