#!/usr/bin/env bash
# ERDE's second teacher pair (results/erde_cifar10_resnet56_cpu/, PLAN.md there):
# an early-exit ResNet-56 teacher (125.81 MMACs at its final exit, 10x the
# ResNet-8 student's 12.56), then KD and ERDE students of it, 3 seeds (the CE
# students do not depend on the teacher: pair 1's serve, results/erde_cifar10_cpu/),
# and the report: against the teacher at 10, 15 and 25% of its MACs, and ERDE
# against KD at 5-10% (the student is 4.1/7.1/10.0% of the teacher at its exits),
# calibrated on each student's validation split, read on test.
# Run from the repository root; every run resumes if restarted. On 2 cores, one
# training per core (taskset -c 0 / -c 1). The teacher takes ~10 h on one core
# (~87 images/s on a Zen 4 EPYC); a KD student ~52 min (it computes the teacher's
# logits, cached under the data cache), the ERDE student of the same seed ~16 min
# (it reads them). The interim report (seeds 0, 1) keeps only its report files.
set -euo pipefail
TEACHER=runs/erde_r56_teacher
TEACHER_ARGS=role=teacher,teacher_depth=56,epochs=40,clip=5,exit_weights=0.3/0.6/1
TEACHER_PARAMS=results/params/erde_teacher_resnet56.npz
OUT=results/erde_cifar10_resnet56_cpu

python -m launch.train --config configs/erde_cifar10.py:$TEACHER_ARGS --workdir $TEACHER --config.eval_every=1404
python -m launch.export --config configs/erde_cifar10.py:$TEACHER_ARGS --workdir $TEACHER --out $TEACHER_PARAMS
python -m launch.evaluate --config configs/erde_cifar10.py:$TEACHER_ARGS --params $TEACHER_PARAMS \
    --out runs/erde_r56_teacher_params
python -m launch.report --summarize $TEACHER --out $OUT/teacher/training_run \
    --command "python -m launch.train --config configs/erde_cifar10.py:$TEACHER_ARGS --workdir $TEACHER --config.eval_every=1404"
python -m launch.report --run teacher=runs/erde_r56_teacher_params --out $OUT/teacher \
    --title "ERDE teacher: early-exit ResNet-56, CIFAR-10, 40 epochs, 2-core CPU"
for seed in 0 1 2; do
  for loss in kd erde; do
    python -m launch.train --config configs/erde_cifar10.py:loss=$loss,epochs=15,seed=$seed,teacher_depth=56,teacher_dir=$TEACHER_PARAMS \
        --workdir runs/erde56_${loss}_s$seed
  done
done
python -m launch.report --seeds 0,1 --run kd=runs/erde56_kd_s{seed} --run erde=runs/erde56_erde_s{seed} \
    --teacher runs/erde_r56_teacher_params --reference erde --teacher_budgets 0.1,0.15,0.25 \
    --seed_budgets 0.05,0.06,0.07,0.08,0.09,0.1 --out $OUT/interim_seeds_0_1 \
    --title "Interim: ERDE vs KD, seeds 0 and 1, ResNet-8 students of a ResNet-56 teacher, CIFAR-10, 15 epochs, 2-core CPU"
rm -f $OUT/interim_seeds_0_1/*_logits.npz  # copies of the files in $OUT
python -m launch.report --seeds 0,1,2 --run kd=runs/erde56_kd_s{seed} --run erde=runs/erde56_erde_s{seed} \
    --teacher runs/erde_r56_teacher_params --reference erde --teacher_budgets 0.1,0.15,0.25 \
    --seed_budgets 0.05,0.06,0.07,0.08,0.09,0.1 --out $OUT \
    --title "ERDE vs KD: ResNet-8 students of a ResNet-56 teacher, CIFAR-10, 15 epochs, 2-core CPU"
