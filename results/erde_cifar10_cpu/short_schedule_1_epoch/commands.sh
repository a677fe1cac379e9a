#!/usr/bin/env bash
# The ERDE experiment of results/erde_cifar10_cpu/short_schedule_1_epoch/ (2-core CPU, offline CIFAR-10):
# an early-exit ResNet-20 teacher (2 epochs) and an early-exit ResNet-8 student
# trained three ways with one recipe (1 epoch each), plus the entropy-term
# ablation. Run from the repository root; each run resumes if restarted.
set -euo pipefail
python -m launch.train --config configs/erde_cifar10.py:role=teacher,epochs=2 --workdir runs/erde_teacher
for loss in ce kd erde; do
  python -m launch.train --config configs/erde_cifar10.py:loss=$loss,epochs=1 --workdir runs/erde_$loss
done
for mode in minimize; do  # "off" was not run here (CPU time); add it to reproduce the full ablation
  python -m launch.train --config configs/erde_cifar10.py:loss=erde,epochs=1,entropy_mode=$mode \
      --workdir runs/erde_entropy_$mode
done
python -m launch.report --run teacher=runs/erde_teacher --run ce=runs/erde_ce --run kd=runs/erde_kd \
    --run erde=runs/erde_erde --out results/erde_cifar10_cpu/short_schedule_1_epoch \
    --title "ERDE: ResNet-8 students of a ResNet-20 teacher, CIFAR-10, 2-core CPU"
python -m launch.report --run erde_maximize=runs/erde_erde --run erde_minimize=runs/erde_entropy_minimize \
    --run kd=runs/erde_kd --out results/erde_cifar10_cpu/short_schedule_1_epoch/ablation \
    --title "ERDE entropy-term ablation, CIFAR-10, 2-core CPU"
python -m launch.report --a erde=runs/erde_erde --b kd=runs/erde_kd --teacher runs/erde_teacher \
    --out results/erde_cifar10_cpu/short_schedule_1_epoch/erde_vs_kd
