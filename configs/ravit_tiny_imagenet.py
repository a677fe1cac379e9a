r"""RAViT on Tiny ImageNet (200 classes, 64x64): branches 32 -> 64.

Tiny ImageNet ships as an image folder; point data.path at the folder or tar
laid out as <split>/<class>/<image> (the official val/ must first be arranged
into class folders) or use a prepared tfds build:

  python -m launch.train --config configs/ravit_tiny_imagenet.py \
      --config.data.path=/data/tiny-imagenet-200 --workdir runs/ravit_tin
  python -m launch.train --config configs/ravit_tiny_imagenet.py:baseline \
      --config.data.path=/data/tiny-imagenet-200 --workdir runs/vit_tin

Arguments: runlocal, baseline (the plain ViT of the last branch, same recipe),
branches=2 (32->64) or 3 (16->32->64), reuse, epochs, batch, lr, variant.
Not run here: no Tiny ImageNet on this machine.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, branches=2, reuse="token", epochs=100, batch=256, lr=1e-3,
                       variant="S/8", baseline=False)
  c = common.base_config()
  common.cifar_vit_recipe(c, epochs=a.epochs, batch=a.batch, lr=a.lr)
  c.data.update(source="folder", name="tiny_imagenet", path=None, num_classes=200,
                image_size=64, augment="inception", val_size=10000, train_split="train",
                test_split="val")
  resolutions = {2: (32, 64), 3: (16, 32, 64)}[a.branches]
  branch = dict(variant=a.variant, pool="token", dropout=0.0, stochastic_depth=0.1)
  if a.runlocal:
    branch = dict(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=8)
  common.cascade_or_baseline(c, branch=branch, resolutions=resolutions, num_classes=200,
                             baseline=a.baseline, reuse=a.reuse)
  if a.runlocal:
    common.runlocal(c, steps=60)
  return c
