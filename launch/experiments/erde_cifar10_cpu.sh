#!/usr/bin/env bash
# The ERDE study of results/erde_cifar10_cpu/ (2-core CPU, offline CIFAR-10):
# the early-exit ResNet-20 teacher (60 epochs), ResNet-8 students trained with
# cross entropy, KD and ERDE, 3 seeds each (15 epochs, one recipe), and the
# entropy-term ablation (minimize / off, 3 seeds), then the reports (budgets
# calibrated on each run's validation split, reported on test).
# Run from the repository root; every run resumes if restarted, so the same
# script continues the study. On 2 cores, run two trainings side by side,
# each pinned to one core (taskset -c 0 / -c 1). The results README lists
# these commands line for line.
# The trained teacher travels as one exported file (results/params/), so the
# students can be trained in a later session on another machine.
set -euo pipefail
TEACHER=runs/erde_teacher_e60
TEACHER_PARAMS=results/params/erde_teacher.npz

python -m launch.train --config configs/erde_cifar10.py:role=teacher,epochs=60 --workdir $TEACHER
python -m launch.export --config configs/erde_cifar10.py:role=teacher,epochs=60 --workdir $TEACHER \
    --out $TEACHER_PARAMS
python -m launch.evaluate --config configs/erde_cifar10.py:role=teacher,epochs=60 \
    --params $TEACHER_PARAMS --out runs/erde_teacher_params
python -m launch.report --summarize $TEACHER --out results/erde_cifar10_cpu/teacher/training_run \
    --command "python -m launch.train --config configs/erde_cifar10.py:role=teacher,epochs=60 --workdir $TEACHER"
for seed in 0 1 2; do
  for loss in ce kd erde; do
    python -m launch.train --config configs/erde_cifar10.py:loss=$loss,epochs=15,seed=$seed,teacher_dir=$TEACHER_PARAMS \
        --workdir runs/erde_${loss}_s$seed
  done
  for mode in minimize off; do
    python -m launch.train --config configs/erde_cifar10.py:loss=erde,entropy_mode=$mode,epochs=15,seed=$seed,teacher_dir=$TEACHER_PARAMS \
        --workdir runs/erde_entropy_${mode}_s$seed
  done
done
python -m launch.report --run teacher=runs/erde_teacher_params --out results/erde_cifar10_cpu/teacher \
    --title "ERDE teacher: early-exit ResNet-20, CIFAR-10, 60 epochs, 2-core CPU"
python -m launch.report --seeds 0,1,2 --run ce=runs/erde_ce_s{seed} --run kd=runs/erde_kd_s{seed} \
    --run erde=runs/erde_erde_s{seed} --teacher runs/erde_teacher_params --reference erde --out results/erde_cifar10_cpu \
    --title "ERDE vs KD vs CE: ResNet-8 students of a ResNet-20 teacher, CIFAR-10, 15 epochs, 2-core CPU"
python -m launch.report --seeds 0,1,2 --run erde=runs/erde_erde_s{seed} --run erde_minimize=runs/erde_entropy_minimize_s{seed} \
    --run erde_off=runs/erde_entropy_off_s{seed} --run kd=runs/erde_kd_s{seed} --teacher runs/erde_teacher_params --reference erde \
    --out results/erde_cifar10_cpu/ablation \
    --title "ERDE entropy-term ablation (maximize / minimize / off), CIFAR-10, 15 epochs, 2-core CPU"
# The interim reports: KD vs ERDE over the first two seeds, the ablation over seed 0.
python -m launch.report --seeds 0,1 --run kd=runs/erde_kd_s{seed} --run erde=runs/erde_erde_s{seed} \
    --teacher runs/erde_teacher_params --reference erde --out results/erde_cifar10_cpu/interim_seeds_0_1_kd_erde \
    --title "Interim: ERDE vs KD, seeds 0 and 1, ResNet-8 students of a ResNet-20 teacher, CIFAR-10, 15 epochs, 2-core CPU"
python -m launch.report --seeds 0 --run erde=runs/erde_erde_s{seed} --run erde_minimize=runs/erde_entropy_minimize_s{seed} \
    --run erde_off=runs/erde_entropy_off_s{seed} --run kd=runs/erde_kd_s{seed} --teacher runs/erde_teacher_params --reference erde \
    --out results/erde_cifar10_cpu/ablation/interim_seed_0 \
    --title "Interim: ERDE entropy-term ablation, seed 0 only, CIFAR-10, 15 epochs, 2-core CPU"
# KD and ERDE seeds 3 and 4 (5 seeds each for the statistics), and their report.
for seed in 3 4; do
  for loss in kd erde; do
    python -m launch.train --config configs/erde_cifar10.py:loss=$loss,epochs=15,seed=$seed,teacher_dir=$TEACHER_PARAMS \
        --workdir runs/erde_${loss}_s$seed
  done
done
python -m launch.report --seeds 0,1,2,3,4 --run kd=runs/erde_kd_s{seed} --run erde=runs/erde_erde_s{seed} \
    --teacher runs/erde_teacher_params --reference erde --out results/erde_cifar10_cpu/seeds_0_4_kd_erde \
    --title "ERDE vs KD, 5 seeds: ResNet-8 students of a ResNet-20 teacher, CIFAR-10, 15 epochs, 2-core CPU"
# The seed-0 ERDE student as one file (launch.predict, benchmarks.run latency).
python -m launch.export --config configs/erde_cifar10.py:loss=erde,epochs=15,seed=0,teacher_dir=$TEACHER_PARAMS \
    --workdir runs/erde_erde_s0 --out results/params/erde_student_s0.npz --budgets 0.55,0.7
