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
  reuse=token  'token' | 'logits' | 'patch' | 'both' | 'none', or parts joined
               by '+' (e.g. token+patch); see adaptive_vision/models/ravit.py
  reuse_init=default  'zeros': reuse projections start at zero (the helped
               branch starts as a plain ViT)
  self_distill=0  weight of the last exit's KL into the earlier exits
  epochs=N, batch=N, lr=X, size=N (first N training images)
  baseline     the plain ViT (Nano/4 at 32x32), same recipe
  later_depth=2, later_width=0   blocks / width of the branches after the first
               (0 = as the first branch's variant)
  full         every branch the whole variant (ablation: no lighter branch)
  stop_grad    no gradient from branch k into branch k-1 through the reused token

Default: 16x16 then 32x32. The first branch is a Nano/4 ViT (width 96, depth
4, 4x4 patches) at 16x16: 16 tokens, 7.82 MMACs (24% of the baseline). The
second branch, helped by the first one's class token, is lighter than the
baseline ViT (Nano/4 at 32x32, 32.29 MMACs), as in the paper: Nano/4 with 2
blocks instead of 4, so the whole cascade costs 24.12 MMACs (74.7% of the
baseline) and every early exit saves more.

Why depth 2: a 3-epoch pilot of lighter second branches (same recipe,
validation split; results/ravit_cifar10_cpu/README.md):
  later_width=64,later_depth=3   cascade 59.5% of the baseline MACs   val 48.46% (last exit)
  later_depth=2                  cascade 74.7%                         val 49.94%
The rule: the best last-exit validation accuracy among cascades at <= 75% of
the baseline's MACs. `full` gives the previous design (second branch = the
whole baseline ViT, cascade 124%), kept for the ablation.

Recipe (configs/common.py cifar_vit_recipe, shared with configs/vit_cifar10.py):
16 epochs (the schedule of results/ravit_cifar10_cpu/, 83 min on one core of a
2-core Xeon), batch 128, AdamW lr 1e-3, wd 0.05, 5% warmup + cosine, clip 1.0,
pad-4 crop + flip. Measured results: results/ravit_cifar10_cpu/.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, branches=2, reuse="token", epochs=16, batch=128, lr=1e-3,
                       size=0, variant="Nano/4", baseline=False, self_distill=0.0,
                       reuse_init="default", seed=0,
                       later_depth=2, later_width=0, full=False, stop_grad=False)
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
  c.seed = a.seed
  if not a.baseline:
    c.model.reuse_init = a.reuse_init
    c.loss.self_distill_weight = a.self_distill
  if a.size:
    c.data.train_size = a.size
  if a.runlocal:
    common.runlocal(c, steps=100)
  return c
