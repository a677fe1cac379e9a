r"""ViT baseline on CIFAR-10 (the offline copy in ../shared/data/cifar10 by default).

Train (and evaluate at the end):

  python -m launch.train --config configs/vit_cifar10.py --workdir runs/vit_cifar10

Arguments after ':' (comma separated):
  runlocal      ~1 minute on a 2-core CPU on built-in synthetic data (no files needed)
  variant=Mu/4  ViT size/patch ('Ti/4', 'S/4', ... see adaptive_vision/models/vit.py)
  epochs=N      training epochs
  size=N        train on the first N training images (quick runs)

The CPU recipe (Mu/4 ViT, 32x32, AdamW, 30 epochs?) and its measured result are
in results/vit_cifar10_cpu.md, with the exact command.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, variant="Mu/4", epochs=30, size=0, batch=128, lr=1e-3)
  c = common.base_config()
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.model = dict(name="vit", variant=a.variant, num_classes=10, image_size=32,
                 pool="token", dropout=0.0, stochastic_depth=0.1)
  c.optim.lr = a.lr
  c.optim.weight_decay = 0.05
  if a.size:
    c.data.train_size = a.size
  c.checkpoint_every = 1000
  c.log_every = 100
  if a.runlocal:
    common.runlocal(c)
    c.model.stochastic_depth = 0.0
  return c
