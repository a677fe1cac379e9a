r"""ERDE on CIFAR-100 (tfds 'cifar100'; prepare it with `tfds build cifar100` where
there is network, or point data.source='folder' / data.path at an image folder).

  python -m launch.train --config configs/erde_cifar100.py:role=teacher --workdir runs/c100_teacher
  python -m launch.train --config configs/erde_cifar100.py:loss=erde,teacher_dir=runs/c100_teacher \
      --workdir runs/c100_erde

Same arguments as configs/erde_cifar10.py. Not run here (no network for tfds).
"""

from configs import common


def get_config(arg=None):
  return common.erde_config(arg, dataset="cifar100", num_classes=100, source="tfds",
                            augment="cifar", teacher_epochs=200,
                            student_epochs=200)
