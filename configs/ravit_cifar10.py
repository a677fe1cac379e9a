r"""RAViT on CIFAR-10 (offline copy in ../shared/data/cifar10 by default).

  python -m launch.train --config configs/ravit_cifar10.py --workdir runs/ravit_cifar10
  python -m launch.evaluate --config configs/ravit_cifar10.py --workdir runs/ravit_cifar10 \
      --baseline runs/vit_cifar10 --out results/ravit_cifar10_cpu

The matching baseline (same recipe: epochs, optimizer, augmentation) is
configs/vit_cifar10.py, i.e. the last branch alone; `:baseline` here gives the
same ViT.

Arguments after ':' (comma separated):
  runlocal     ~1 minute on a 2-core CPU on synthetic data
  branches=2   16->32 (default) or 3: 8->16->32
  reuse=token  'token' | 'logits' | 'both' | 'none' (ablation)
  epochs=N, batch=N, lr=X, size=N (first N training images)
  baseline     the plain ViT of the last branch, same recipe

Default split, 16x16 then 32x32, both Nano/4 branches (width 96, depth 4, 4x4
patches): the 16x16 branch sees 16 tokens and costs ~25% of the 32x32 branch,
so easy images can leave for a quarter of the baseline's compute; the 32x32
branch is the baseline ViT plus the reused class token. Measured results:
results/ravit_cifar10_cpu/.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, branches=2, reuse="token", epochs=40, batch=128, lr=1e-3,
                       size=0, variant="Nano/4", baseline=False, self_distill=0.0,
                       later_depth=0, later_width=0, full=False, stop_grad=False)
  c = common.base_config()
  common.cifar_vit_recipe(c, epochs=a.epochs, batch=a.batch, lr=a.lr)
  resolutions = {2: (16, 32), 3: (8, 16, 32)}.get(a.branches)
  if resolutions is None:
    raise ValueError(f"branches={a.branches}; use 2 (16->32) or 3 (8->16->32)")
  branch = dict(variant=a.variant, pool="token", dropout=0.0, stochastic_depth=0.0)
  if a.runlocal:
    branch = dict(width=64, depth=2, num_heads=2, mlp_dim=128, patch_size=4)
  later = {}
  if a.later_depth:
    later["depth"] = a.later_depth
  if a.later_width:  # heads of 32 channels, MLP 4x wide, as in the Nano/Mu sizes
    later.update(width=a.later_width, num_heads=max(a.later_width // 32, 1),
                 mlp_dim=4 * a.later_width)
  if a.full or a.runlocal:
    later = {}
  common.cascade_or_baseline(c, branch=branch, resolutions=resolutions, num_classes=10,
                             baseline=a.baseline, reuse=a.reuse, later=later,
                             **({"stop_gradient_reuse": True} if a.stop_grad else {}))
  if not a.baseline:
    c.loss.self_distill_weight = a.self_distill
  if a.size:
    c.data.train_size = a.size
  if a.runlocal:
    common.runlocal(c, steps=100)
  return c
