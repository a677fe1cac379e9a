r"""ViT baseline on CIFAR-10 (the offline copy in ../shared/data/cifar10 by default).

Train (and evaluate at the end):

  python -m launch.train --config configs/vit_cifar10.py --workdir runs/vit_cifar10

Arguments after ':' (comma separated):
  runlocal      ~1 minute on a 2-core CPU on built-in synthetic data (no files needed)
  variant=Mu/4  ViT size/patch ('Ti/4', 'S/4', ... see adaptive_vision/models/vit.py)
  epochs=N      training epochs
  size=N        train on the first N training images (quick runs)
  seed=N        initialization, data order, augmentation

The default is the CPU recipe shared with configs/ravit_cifar10.py (Nano/4 ViT:
width 96, depth 4, 3 heads, 4x4 patches; AdamW lr 1e-3, wd 0.05, cosine, 16 epochs,
batch 128, pad-4 crop + flip): 70.83% test accuracy on the offline copy, 97 min on
one core of a 2-core Xeon (results/ravit_cifar10_cpu/, with the exact command).
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, variant="Nano/4", epochs=16, size=0, batch=128, lr=1e-3, sd=0.0,
                       seed=0)
  c = common.base_config()
  c.seed = a.seed
  common.cifar_vit_recipe(c, epochs=a.epochs, batch=a.batch, lr=a.lr)
  c.model = dict(name="vit", variant=a.variant, num_classes=10, image_size=32,
                 pool="token", dropout=0.0, stochastic_depth=a.sd)
  if a.size:
    c.data.train_size = a.size
  if a.runlocal:
    common.runlocal(c, steps=100)
    c.model.variant = None
    c.model.update(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=4)
  return c
