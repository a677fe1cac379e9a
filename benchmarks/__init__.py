"""Benchmarks of adaptive_vision on the machine they run on: one runner.

    python -m benchmarks.run [--quick] [--out results/bench_cpu.json]   the suite
    python -m benchmarks.run paired [--model vit|ravit] ...   train-step variants, paired
    python -m benchmarks.run cnn ...        the ERDE CNN steps against PyTorch, paired
    python -m benchmarks.run pipeline ...   the real input pipeline against the step
    python -m benchmarks.run latency ...    batch-1 latency of the early-exit executors

The suite measures, in one run: the machine's matmul peak through JAX, the
jitted train step of the CIFAR ViT and RAViT configs (images/s, XLA-counted
FLOP/s and their fraction of the peak, compile time), the same ViT written in
PyTorch (eager and torch.compile), inference throughput / latency with real
dynamic early exits against the MAC-predicted speedup, and peak resident
memory of training; it writes the JSON and its Markdown report (targets
included). The other commands time variants in alternating rounds in one
process (paired ratios, medians and quartiles). See docs/benchmarks.md.
`benchmarks/gpu.sh` runs the ImageNet-size suite on a GPU.

Modules:
  run.py        the command line (the suite, and the sub-commands below)
  paired.py     train-step variants of the ViT / RAViT, paired, with the PyTorch peer
  cnn.py        the ERDE teacher / student steps, paired, with their PyTorch peers
  pipeline.py   the input pipeline alone and feeding the train step
  latency.py    batch 1: single-dispatch early exits against the plain models, paired
  common.py     machine description, timing, paired rounds, child processes
  suites.py     the model / batch / repetition settings of each suite
  jax_bench.py  peak matmul, train step, inference and early-exit measurements
  torch_vit.py, torch_resnet.py   the PyTorch peers
  child.py      measurements that run in their own process (memory, torch)
  report.py     the Markdown report and the targets
  investigations/  one-off tools (per-op profile, isolated matmuls), off the main path
  gpu.sh        the imagenet suite on an accelerator
"""
