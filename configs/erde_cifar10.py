r"""ERDE on CIFAR-10: an early-exit ResNet teacher and a cheaper early-exit student.

Teacher first, then the student three ways (same recipe and epochs):

  python -m launch.train --config configs/erde_cifar10.py:role=teacher --workdir runs/erde_teacher
  python -m launch.train --config configs/erde_cifar10.py:loss=ce   --workdir runs/erde_ce
  python -m launch.train --config configs/erde_cifar10.py:loss=kd   --workdir runs/erde_kd
  python -m launch.train --config configs/erde_cifar10.py:loss=erde --workdir runs/erde_erde
  python -m launch.report_erde --runs runs --out results/erde_cifar10_cpu

Arguments (comma separated after ':'): role=teacher|student, loss=ce|kd|erde,
teacher_dir=DIR, teacher_depth=20, student_depth=8, width_multiplier=1.0,
epochs, batch, lr, temperature=4, kd_weight=1, entropy_weight=0.5,
entropy_mode=maximize|minimize|off, kl_on_wrong, size=N, runlocal.
Reads the offline CIFAR-10 folder by default. Results: results/erde_cifar10_cpu/.
"""

from configs import common


def get_config(arg=None):
  return common.erde_config(arg, dataset="cifar10", num_classes=10, source="folder",
                            path=common.OFFLINE_CIFAR10, augment="cifar", epochs=15)
