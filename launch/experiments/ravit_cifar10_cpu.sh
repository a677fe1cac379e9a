#!/usr/bin/env bash
# The RAViT vs ViT experiment of results/ravit_cifar10_cpu/ (2-core CPU, offline CIFAR-10).
# Both runs share the recipe (configs/common.py:cifar_vit_recipe). Each run
# resumes if restarted. Run from the repository root.
set -euo pipefail
python -m launch.train --config configs/vit_cifar10.py --workdir runs/vit_cifar10
python -m launch.train --config configs/ravit_cifar10.py --workdir runs/ravit_cifar10
python -m launch.report --run ravit=runs/ravit_cifar10 --baseline runs/vit_cifar10 \
    --out results/ravit_cifar10_cpu --title "RAViT 16->32 vs ViT, CIFAR-10, 2-core CPU"
python -m launch.summarize --workdir runs/vit_cifar10 --out results/vit_cifar10_cpu \
    --command "python -m launch.train --config configs/vit_cifar10.py --workdir runs/vit_cifar10"
