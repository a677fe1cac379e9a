#!/usr/bin/env bash
# The benchmark on one accelerator (GPU; a TPU VM works the same way), in
# under 10 minutes: ViT-S/16 at 224x224 and a RAViT with S/16 branches at
# 112->160->224, bfloat16 compute, synthetic batches on device. Training
# FLOP/s are reported against the card's measured bf16 matmul peak (MFU);
# the PyTorch peer runs on the same GPU when torch has CUDA.
#
#   bash benchmarks/gpu.sh                 # -> results/bench_gpu_imagenet.{json,md}
#   bash benchmarks/gpu.sh --quick         # tiny shapes: checks it runs (also on CPU)
#   bash benchmarks/gpu.sh --train-batch 128 --out results/bench_h100.json
#
# Any python -m benchmarks.run flag may follow. PYTHON picks the interpreter
# (default: python3). See docs/benchmarks.md.
set -euo pipefail
cd "$(dirname "$0")/.."
# JAX would otherwise take 75% of GPU memory up front, leaving the PyTorch
# peer (a child process on the same GPU) too little.
export XLA_PYTHON_CLIENT_PREALLOCATE="${XLA_PYTHON_CLIENT_PREALLOCATE:-false}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" -m benchmarks.run --suite imagenet "$@"
