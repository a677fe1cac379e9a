r"""RAViT on ImageNet-1k: three S/16 branches at 112 -> 160 -> 224.

  python -m launch.train --config configs/ravit_imagenet.py --workdir gs://bucket/ravit_in1k \
      --config.data.path=gs://bucket/tfds --distributed      # on every TPU VM worker
  python -m launch.train --config configs/ravit_imagenet.py:baseline --workdir .../vit_s16

tfds 'imagenet2012' must be prepared in data.path (manual download). Recipe:
AdamW, batch 1024, 300 epochs, inception crop + flip, stochastic depth 0.1,
bf16 compute, data-parallel mesh over all devices (FSDP with
--config.param_sharding=fsdp). Not run here.
"""

from configs import common


def get_config(arg=None):
  a = common.parse_arg(arg, branches=3, reuse="token", epochs=300, batch=1024, lr=1e-3,
                       variant="S/16", baseline=False)
  c = common.base_config()
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  c.optim.update(name="adamw", lr=a.lr, weight_decay=0.05, warmup_steps=10000,
                 warmup_fraction=0.0, schedule="cosine", grad_clip=1.0)
  c.data.update(source="tfds", name="imagenet2012", path=None, num_classes=1000,
                image_size=224, augment="inception", val_size=10000,
                train_split="train", test_split="validation")
  c.checkpoint_every = 2000
  c.log_every = 200
  resolutions = {2: (160, 224), 3: (112, 160, 224)}[a.branches]
  branch = dict(variant=a.variant, pool="token", dropout=0.0, stochastic_depth=0.1)
  if a.runlocal:
    branch = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=16)
  common.cascade_or_baseline(c, branch=branch, resolutions=resolutions, num_classes=1000,
                             baseline=a.baseline, reuse=a.reuse, dtype="bfloat16")
  if a.runlocal:
    common.runlocal(c, steps=20, batch=8)
    c.data.update(synthetic_train_size=256, synthetic_test_size=64, val_size=32)
    c.eval_batch_size = 32
  return c
