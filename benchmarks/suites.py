"""What each suite measures: model configs, batch sizes, repetitions.

* ``cifar``: the CPU recipe, configs/vit_cifar10.py and configs/ravit_cifar10.py
  with their default arguments (Nano/4 ViT, width 96, depth 4, 32x32, batch
  128; RAViT 16->32).
* ``imagenet``: the accelerator suite, configs/ravit_imagenet.py: ViT-S/16 at
  224x224 (':baseline') and a RAViT with S/16 branches at 112->160->224,
  bfloat16 compute, batch 256 (the data are synthetic: no ImageNet needed).
* ``--quick`` shrinks either to tiny models and few repetitions (smoke test).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import ml_collections


@dataclasses.dataclass
class Suite:
  name: str
  quick: bool
  vit: ml_collections.ConfigDict     # full trainer configs (model, optim, loss, data)
  ravit: ml_collections.ConfigDict
  train_batch: int
  train_steps_per_rep: int
  reps: int
  warmup: int
  infer_batch: int                   # throughput batch (>= 128 outside --quick)
  latency_images: int                # single images timed for batch-1 latency
  matmul_sizes: tuple[int, ...]
  peak_dtype: str                    # dtype of the peak used for fractions / MFU
  exit_fractions: tuple[float, ...]  # synthetic operating points (first-exit fractions)
  buckets: Any                       # DynamicCascade buckets (None = library default)
  torch_compile: bool
  memory_steps: int
  child_timeout_s: float
  compile_timeout_s: float
  notes: list = dataclasses.field(default_factory=list)

  @property
  def dtype(self) -> str:
    return str(self.vit.model.get("dtype") or "float32")

  def describe(self) -> dict:
    return {
        "name": self.name, "quick": self.quick, "train_batch": self.train_batch,
        "train_steps_per_rep": self.train_steps_per_rep, "reps": self.reps,
        "warmup": self.warmup, "infer_batch": self.infer_batch,
        "latency_images": self.latency_images, "matmul_sizes": list(self.matmul_sizes),
        "peak_dtype": self.peak_dtype, "compute_dtype": self.dtype,
        "exit_fractions": list(self.exit_fractions),
        "buckets": None if self.buckets is None else [float(b) for b in self.buckets],
        "torch_compile": self.torch_compile, "memory_steps": self.memory_steps,
        "vit_model": self.vit.model.to_dict(), "ravit_model": _jsonable(self.ravit.model.to_dict()),
        "optim": self.vit.optim.to_dict(), "notes": list(self.notes),
    }


def _jsonable(x):
  if isinstance(x, dict):
    return {k: _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  return x


# Buckets of the dynamic executor for the benchmark: eighths of the batch, so
# the padded work follows the exit fractions closely (the library default,
# powers of two, pads 384 remaining of 512 up to 512).
EIGHTHS = tuple(i / 8 for i in range(1, 9))


def _with_batch(c, batch: int):
  c.batch_size = batch
  return c


def cifar(quick: bool = False, train_batch: Optional[int] = None) -> Suite:
  from configs import ravit_cifar10, vit_cifar10
  if not quick:
    vit, ravit = vit_cifar10.get_config(), ravit_cifar10.get_config()
    batch = train_batch or vit.batch_size
    return Suite(
        name="cifar", quick=False, vit=_with_batch(vit, batch),
        ravit=_with_batch(ravit, batch), train_batch=batch, train_steps_per_rep=10,
        reps=5, warmup=2, infer_batch=512, latency_images=32,
        matmul_sizes=(1024, 2048, 4096), peak_dtype="float32",
        exit_fractions=(0.25, 0.5, 0.75), buckets=EIGHTHS, torch_compile=True,
        memory_steps=5, child_timeout_s=300, compile_timeout_s=300)
  vit = vit_cifar10.get_config("runlocal")
  tiny = dict(width=32, depth=1, num_heads=2, mlp_dim=64, patch_size=4)
  vit.model.update(image_size=16, **tiny)
  vit.data.image_size = 16
  ravit = ravit_cifar10.get_config("runlocal")
  ravit.model.branches = tuple(dict(resolution=r, **tiny) for r in (8, 16))
  ravit.data.image_size = 16
  batch = train_batch or 16
  return Suite(
      name="cifar", quick=True, vit=_with_batch(vit, batch), ravit=_with_batch(ravit, batch),
      train_batch=batch, train_steps_per_rep=2, reps=2, warmup=1, infer_batch=32,
      latency_images=2, matmul_sizes=(128, 256), peak_dtype="float32",
      exit_fractions=(0.25, 0.75), buckets=EIGHTHS, torch_compile=False, memory_steps=2,
      child_timeout_s=120, compile_timeout_s=120,
      notes=["--quick: tiny models (width 32, depth 1, 16x16 / 8->16), few reps; "
             "the figures only show that the benchmark runs"])


def imagenet(quick: bool = False, train_batch: Optional[int] = None,
             dtype: str = "bfloat16") -> Suite:
  """configs/ravit_imagenet.py (RAViT, S/16 branches at 112->160->224) and its
  ':baseline' (ViT-S/16 at 224), bf16 compute, at a benchmark batch of 256
  (the recipe's 1024 is for a whole TPU slice). Stochastic depth 0.1 as in the
  recipe (the PyTorch peer implements it too)."""
  from configs import ravit_imagenet
  arg = "runlocal," if quick else ""
  vit = ravit_imagenet.get_config(arg + "baseline")
  ravit = ravit_imagenet.get_config(arg.rstrip(",") or None)
  batch = train_batch or (8 if quick else 256)
  for c in (vit, ravit):
    c.batch_size = batch
    c.model.dtype = dtype
  if quick:
    return Suite(
        name="imagenet", quick=True, vit=vit, ravit=ravit, train_batch=batch,
        train_steps_per_rep=2, reps=2, warmup=1, infer_batch=16, latency_images=2,
        matmul_sizes=(256,), peak_dtype=dtype, exit_fractions=(0.5,), buckets=EIGHTHS,
        torch_compile=False, memory_steps=2, child_timeout_s=120, compile_timeout_s=120,
        notes=["--quick: the runlocal models of configs/ravit_imagenet.py (width 32, "
               "depth 1, S/16 patches at 112->160->224); only shows the suite runs"])
  return Suite(
      name="imagenet", quick=False, vit=vit, ravit=ravit, train_batch=batch,
      train_steps_per_rep=10, reps=5, warmup=2, infer_batch=512, latency_images=16,
      matmul_sizes=(4096, 8192), peak_dtype=dtype, exit_fractions=(0.25, 0.5, 0.75),
      buckets=EIGHTHS, torch_compile=True, memory_steps=5, child_timeout_s=300,
      compile_timeout_s=300)


SUITES = {"cifar": cifar, "imagenet": imagenet}


def get(name: str, *, quick: bool = False, train_batch: Optional[int] = None,
        dtype: Optional[str] = None, attention: Optional[str] = None) -> Suite:
  if name not in SUITES:
    raise ValueError(f"unknown suite {name!r}; use one of {sorted(SUITES)}")
  kwargs = {}
  if name == "imagenet" and dtype:
    kwargs["dtype"] = dtype
  suite = SUITES[name](quick=quick, train_batch=train_batch, **kwargs)
  if name == "cifar" and dtype and dtype != "float32":
    for c in (suite.vit, suite.ravit):
      c.model.dtype = dtype
    suite.peak_dtype = dtype
    suite.notes.append(f"model compute dtype overridden to {dtype}")
  if attention:
    suite.vit.model.attention = attention
    suite.ravit.model.branches = tuple(dict(b, attention=attention)
                                       for b in suite.ravit.model.branches)
    suite.notes.append(f"attention implementation overridden to {attention!r}")
  return suite
