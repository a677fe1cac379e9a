r"""ERDE on SVHN (tfds 'svhn_cropped'; no horizontal flips for digits).

  python -m launch.train --config configs/erde_svhn.py:role=teacher --workdir runs/svhn_teacher
  python -m launch.train --config configs/erde_svhn.py:loss=erde,teacher_dir=runs/svhn_teacher \
      --workdir runs/svhn_erde

Same arguments as configs/erde_cifar10.py. Not run here (no network for tfds).
"""

from configs import common


def get_config(arg=None):
  return common.erde_config(arg, dataset="svhn_cropped", num_classes=10, source="tfds",
                            augment="none", teacher_epochs=40,
                            student_epochs=40)
