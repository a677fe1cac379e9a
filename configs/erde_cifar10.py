r"""ERDE on CIFAR-10: an early-exit ResNet teacher and a cheaper early-exit student.

Teacher first (60 epochs), then the student three ways, 3 seeds each (30
epochs, same recipe), then the report and the comparisons:

  python -m launch.train --config configs/erde_cifar10.py:role=teacher --workdir runs/erde_teacher
  python -m launch.train --config configs/erde_cifar10.py:loss=ce,seed=0   --workdir runs/erde_ce_s0
  python -m launch.train --config configs/erde_cifar10.py:loss=kd,seed=0   --workdir runs/erde_kd_s0
  python -m launch.train --config configs/erde_cifar10.py:loss=erde,seed=0 --workdir runs/erde_erde_s0
  ... seeds 1 and 2 alike, then
  python -m launch.report --seeds 0,1,2 --run ce=runs/erde_ce_s{seed} \
      --run kd=runs/erde_kd_s{seed} --run erde=runs/erde_erde_s{seed} \
      --teacher runs/erde_teacher --reference erde --out results/erde_cifar10
  (launch/experiments/erde_cifar10_cpu.sh runs the 2-core CPU study of
  results/erde_cifar10_cpu/ with explicit epochs: teacher 60, students 15.)

Arguments (comma separated after ':'): role=teacher|student, loss=ce|kd|erde,
seed=N, teacher_dir=DIR, teacher_depth=20, student_depth=8,
width_multiplier=1.0, epochs (0 = the role's default: teacher 60, students 30),
batch, lr, temperature=4, kd_weight=1, entropy_weight=0.5,
entropy_mode=maximize|minimize|off, kl_on_wrong, size=N, runlocal.

Models: ResNet-20 teacher (40.87 MMACs at its final exit) and ResNet-8 student
(12.56 MMACs, 31% of the teacher), ERDE exit heads after stages 1 and 2.
Recipe: SGD + Nesterov 0.9, lr 0.1, wd 5e-4, batch 128, 10% warmup + cosine,
clipping 2.0, pad-4 crop + flip. Reads the offline CIFAR-10 folder by default.
Expected: the teacher at >= 88% final-exit test accuracy (ResNet-20 reaches
~91% on the original CIFAR-10 with long schedules). Measured: 60 epochs gave
86.42% (20 epochs 84.14%), results/erde_cifar10_cpu/teacher/. Speed depends
on the CPU: the 60-epoch teacher trained at 92-370 images/s on the 2-core
machines it ran on (~2 h at the fastest, on a Zen 5 EPYC with AVX-512).
Results: results/erde_cifar10_cpu/.
"""

from configs import common


def get_config(arg=None):
  return common.erde_config(arg, dataset="cifar10", num_classes=10, source="folder",
                            path=common.OFFLINE_CIFAR10, augment="cifar",
                            teacher_epochs=60, student_epochs=30)
