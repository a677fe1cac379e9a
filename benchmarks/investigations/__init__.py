"""One-off investigations, kept runnable but off the benchmark's main path.

  python -m benchmarks.investigations.profile  per-op times of a train step
                                              (jax.profiler trace + HLO metadata)
  python -m benchmarks.investigations.micro    the ViT's matmuls and attention
                                              alone, JAX against PyTorch

Their findings are written up in results/bench_notes.md; the benchmark itself
is `python -m benchmarks.run` (docs/benchmarks.md).
"""
