"""Pieces shared by the config files: argument parsing and base fields."""

from __future__ import annotations

import os

import ml_collections

# The offline CIFAR-10 copy beside the checkout (see its README).
OFFLINE_CIFAR10 = os.path.normpath(
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "cifar10"))


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
  """'runlocal,variant=S/4,epochs=5' -> ConfigDict(runlocal=True, variant='S/4', epochs=5).

  Only keys given in `defaults` (plus 'runlocal') are accepted, with their types.
  """
  defaults = dict(defaults)
  defaults.setdefault("runlocal", False)
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, eq, value = item.partition("=")
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r}; valid: {sorted(defaults)}")
    if not eq:
      out[key] = True
      continue
    kind = type(defaults[key])
    if kind is bool:
      out[key] = value.lower() in ("1", "true", "yes")
    elif defaults[key] is None:
      out[key] = value
    else:
      out[key] = kind(value)
  return ml_collections.ConfigDict(out)


def base_config() -> ml_collections.ConfigDict:
  """Every field the library reads, with its default: the only place defaults
  live. Configs start from it and override; library code reads keys without
  defaults of its own, so a config lacking one is a one-line error naming it.

  loss.entropy_weight is the ERDE entropy term's weight (0.5, the ERDE
  configs' value), so --config.loss.name=erde keeps the term; the 'ce' and
  'kd' losses do not read it.
  """
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.batch_size = 128
  c.eval_batch_size = 500
  c.num_epochs = 1
  c.total_steps = 0          # >0 overrides num_epochs
  c.stop_at_step = 0         # >0: stop this invocation there (checkpointed); rerun resumes
  c.allow_config_change = False  # resume a workdir even if its recipe changed
  c.log_every = 50
  c.eval_every = 0           # steps; 0 = only at the end
  c.checkpoint_every = 500
  c.max_to_keep = 3
  c.async_checkpoints = True
  c.eval_splits = ("val", "test")
  c.param_sharding = "replicate"   # or 'fsdp'
  c.mesh = ml_collections.ConfigDict(dict(data=-1, model=1))
  c.data = ml_collections.ConfigDict(dict(
      source="folder", name="cifar10", path=OFFLINE_CIFAR10, cache_dir=None,
      num_classes=10, image_size=32, augment="cifar",
      normalize="auto", train_split="train", test_split="test", val_size=5000,
      split_seed=0, train_size=None, test_size=None, on_bad_image="error",
      cache_image_size=None, synthetic_train_size=2048, synthetic_test_size=512,
      synthetic_seed=0, num_workers=0, prefetch_buffer_size=2))
  c.loss = ml_collections.ConfigDict(dict(
      name="ce", exit_weights=None, self_distill_weight=0.0, temperature=1.0,
      kd_weight=1.0, entropy_weight=0.5, entropy_mode="maximize", kl_on_wrong=False))
  c.optim = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3, weight_decay=0.05, b1=0.9, b2=0.999, eps=1e-8,
      momentum=0.9, nesterov=True, warmup_steps=0, warmup_fraction=0.05,
      schedule="cosine", end_lr_factor=0.0, grad_clip=1.0, wd_mask="kernels"))
  # Implementations of the run's layers and programs, chosen once per run from
  # these and the mesh (adaptive_vision/backend.py; read on CPU only, see
  # adaptive_vision/cpu): 'auto' picks the fastest that runs on the mesh.
  c.backend = ml_collections.ConfigDict(dict(
      conv="auto", norm="auto", exit_head="auto", decide="auto", attention="auto"))
  c.teacher = None
  # Distillation: '' computes the teacher's logits inside every step; 'auto'
  # (<teacher.checkpoint>/logits_cache) or a folder stores them per step, so
  # students of one seed share them (adaptive_vision/train/teacher_cache.py).
  c.teacher_cache = ""
  # One writer per workdir (adaptive_vision/workdir_lock.py): the holder renews
  # its lock every heartbeat_seconds; a holder on another host that has not
  # renewed it for lease_seconds counts as dead and its lock is taken over.
  c.workdir_lock = ml_collections.ConfigDict(dict(lease_seconds=180.0, heartbeat_seconds=30.0))
  return c


def runlocal(c: ml_collections.ConfigDict, *, steps: int = 150, batch: int = 64):
  """Shrinks a config to about a minute on a 2-core CPU, on synthetic data."""
  c.data.source = "synthetic"
  c.data.path = None
  c.data.val_size = 256
  c.batch_size = batch
  c.eval_batch_size = 256
  c.total_steps = steps
  c.log_every = 25
  c.checkpoint_every = 50
  c.optim.warmup_steps = 10
  return c


def cifar_vit_recipe(c: ml_collections.ConfigDict, *, epochs: int, batch: int, lr: float):
  """The CIFAR recipe that ViT baselines and RAViT share (same epochs,
  optimizer and augmentation, so the comparison is like for like)."""
  c.batch_size = batch
  c.num_epochs = epochs
  c.optim.update(name="adamw", lr=lr, weight_decay=0.05, warmup_fraction=0.05,
                 schedule="cosine", grad_clip=1.0)
  c.data.augment = "cifar"
  c.checkpoint_every = 300
  c.log_every = 50
  return c


def erde_config(arg, *, dataset: str, num_classes: int, source: str,
                path=None, augment: str = "cifar", teacher_epochs: int = 60,
                student_epochs: int = 30):
  """Teacher or student of an ERDE experiment (configs/erde_*.py).

  role=teacher  ResNet-<teacher_depth> with exits after stages 1 and 2, cross entropy
  role=student  ResNet-<student_depth> with exits after stages 1 and 2, loss ce|kd|erde
                distilled from the teacher in teacher_dir (a run folder, or a
                parameters file of launch.export)
  epochs=0 means the role's default (teacher_epochs / student_epochs); seed=N
  sets the run's seed (initialization, data order, augmentation, dropout);
  teacher_cache=auto stores the teacher's logits per step in the teacher's
  workdir, shared by every student of the same seed (teacher_cache= turns it off).
  exit_weights=0.3/0.6/1 weighs the exits' losses (cheapest first; default: all 1);
  clip=0 turns gradient clipping off.
  """
  a = parse_arg(arg, role="student", loss="erde", teacher_dir="runs/erde_teacher",
                teacher_depth=20, student_depth=8, width_multiplier=1.0,
                epochs=0, batch=128, lr=0.1, temperature=4.0, kd_weight=1.0,
                entropy_weight=0.5, entropy_mode="maximize", kl_on_wrong=False, size=0,
                warmup=0.1, clip=2.0, seed=0, teacher_cache="auto", exit_weights="")
  if a.role not in ("teacher", "student"):
    raise ValueError(f"role={a.role!r}; use role=teacher or role=student")
  if not a.epochs:
    a.epochs = teacher_epochs if a.role == "teacher" else student_epochs
  c = base_config()
  c.seed = a.seed
  c.data.update(source=source, name=dataset, path=path, num_classes=num_classes,
                image_size=32, augment=augment)
  c.batch_size = a.batch
  c.num_epochs = a.epochs
  # Warmup and clipping keep the exit heads alive: with 2% warmup and no
  # clipping, lr 0.1 drove the first exit head's BatchNorm bias so negative
  # that every ReLU after it died (a constant 10%-accuracy exit; measured).
  c.optim.update(name="sgd", lr=a.lr, momentum=0.9, nesterov=True, weight_decay=5e-4,
                 warmup_fraction=a.warmup, schedule="cosine", grad_clip=a.clip)
  c.checkpoint_every = 300
  c.log_every = 50
  if a.exit_weights:
    c.loss.exit_weights = tuple(float(w) for w in a.exit_weights.split("/"))

  def resnet(depth, width_multiplier=1.0):
    # Exits after stages 1 and 2 of a CIFAR ResNet-(6n+2): after blocks n-1 and 2n-1.
    n = (depth - 2) // 6
    return dict(name="resnet", depth=depth, width=16, width_multiplier=width_multiplier,
                num_classes=num_classes, exits=(n - 1, 2 * n - 1),
                exit_dropout=0.5, image_size=32)

  teacher = resnet(a.teacher_depth)
  if a.role == "teacher":
    c.model = teacher
    c.loss.name = "ce"
  else:
    c.model = resnet(a.student_depth, a.width_multiplier)
    c.loss.update(name=a.loss, temperature=a.temperature, kd_weight=a.kd_weight,
                  entropy_weight=a.entropy_weight if a.loss == "erde" else 0.0,
                  entropy_mode=a.entropy_mode, kl_on_wrong=a.kl_on_wrong)
    if a.loss != "ce":
      c.teacher = ml_collections.ConfigDict(dict(model=teacher, checkpoint=a.teacher_dir))
      # The kd / erde students of one seed (and the ablations) share the
      # teacher's logits: about half of a student step on a CPU.
      c.teacher_cache = a.teacher_cache
  if a.size:
    c.data.train_size = a.size
  if a.runlocal:
    runlocal(c, steps=100)
    c.optim.lr = 0.05
    for m in [c.model] + ([c.teacher.model] if c.teacher else []):
      m.width_multiplier = 0.5
  return c


def cascade_or_baseline(c: ml_collections.ConfigDict, *, branch: dict, resolutions,
                        num_classes: int, baseline: bool, reuse: str = "token",
                        later: dict | None = None, **model_extra):
  """Sets c.model to a RAViT over `resolutions`, or with `baseline` to the plain
  ViT of `branch` at the last resolution, so both share one recipe.

  Every branch is `branch`; branches after the first are updated with `later`
  (e.g. dict(depth=2)), which makes the helped branches lighter than the
  baseline, as in the paper.
  """
  if baseline:
    c.model = dict(name="vit", num_classes=num_classes, image_size=resolutions[-1],
                   **model_extra, **branch)
  else:
    branches = [dict(resolution=resolutions[0], **branch)]
    branches += [dict(dict(resolution=r, **branch), **(later or {})) for r in resolutions[1:]]
    c.model = dict(name="ravit", num_classes=num_classes, reuse=reuse, **model_extra,
                   branches=tuple(branches))
  # The data views follow from the model (models.data_views): nothing to set here.
  return c
