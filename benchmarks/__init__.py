"""Benchmarks of adaptive_vision on the machine they run on.

    python -m benchmarks.run [--quick] [--out results/bench_cpu.json]

measures, in one run: the machine's matmul peak through JAX, the jitted train
step of the CIFAR ViT and RAViT configs (images/s, XLA-counted FLOP/s and their
fraction of the peak, compile time), the same ViT written in PyTorch (eager and
torch.compile), inference throughput / latency with real dynamic early exits
against the MAC-predicted speedup, and peak resident memory of training. See
docs/benchmarks.md. `benchmarks/gpu.sh` runs the ImageNet-size suite on a GPU.

Modules:
  common.py     machine description, timing, progress lines, child processes
  suites.py     the model / batch / repetition settings of each suite
  jax_bench.py  peak matmul, train step, inference and early-exit measurements
  torch_vit.py  the PyTorch peer of the ViT and its measurements
  child.py      measurements that run in their own process (memory, torch)
  report.py     the Markdown table and the targets
  run.py        the command line
  profile.py    per-op times of the train step (python -m benchmarks.profile)
  sweep.py      XLA-flag / batch / dtype variants of the train step, one process each
  gpu.sh        the imagenet suite on an accelerator
"""
