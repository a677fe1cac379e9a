"""Model families, looked up by name.

`model_cfg.name` names a module `adaptive_vision.models.<name>` that exposes
`build(model_cfg)`, `exit_macs(model_cfg)` and `input_sizes(model_cfg)`;
adding a family means adding a module, with no table to edit. Every family's
module returns `(exit_logits, out)` with `exit_logits` a tuple of [B, K]
arrays, cheapest exit first (a single-exit model returns a tuple of one).

Inputs: `input_sizes` lists the square image sizes the model reads, and a
family that reads a tuple of views (one per size, lowest first) says so with
`TAKES_VIEWS = True`; otherwise the model reads one image batch. The trainer
derives the data views from these (`data_views`) and hands each model its
inputs with `inputs_from_batch`, so it never needs to know a family by name.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Sequence

from adaptive_vision.exits import as_exits  # noqa: F401  (re-exported)


def _family(name: str):
  try:
    module = importlib.import_module(f"adaptive_vision.models.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"adaptive_vision.models.{name}":
      raise
    raise ValueError(
        f"unknown model.name={name!r}; use one of {available()} "
        "(each is a module in adaptive_vision/models/)") from None
  if not all(hasattr(module, f) for f in ("build", "exit_macs", "input_sizes")):
    raise ValueError(f"adaptive_vision.models.{name} is not a model family "
                     "(it needs build(), exit_macs() and input_sizes())")
  return module


def available() -> list[str]:
  """The model families: modules of this package with the family functions
  (helper modules such as layers.py and exit_heads.py are not families)."""
  import pkgutil
  names = sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
  return [n for n in names
          if all(hasattr(importlib.import_module(f"adaptive_vision.models.{n}"), f)
                 for f in ("build", "exit_macs", "input_sizes"))]


def build(model_cfg, layers=None):
  """Returns the flax.linen module described by `model_cfg`.

  `layers` (`models.layers.Layers`, default plain flax) is where the model's
  layers come from: the one seam through which a backend hands it faster
  kernels with the same variables (`adaptive_vision.backend`). A family whose
  module has no `layers` field is built as it is.
  """
  module = _family(model_cfg.name).build(model_cfg)
  if layers is not None and "layers" in {f.name for f in dataclasses.fields(module)}:
    module = module.clone(layers=layers)
  return module


def exit_macs(model_cfg) -> list[float]:
  """Cumulative MACs per image to reach and evaluate each exit."""
  return [float(m) for m in _family(model_cfg.name).exit_macs(model_cfg)]


def input_sizes(model_cfg) -> tuple[int, ...]:
  """Square image sizes the model reads, lowest first (one for most models)."""
  sizes = tuple(int(s) for s in _family(model_cfg.name).input_sizes(model_cfg))
  if not sizes or any(s <= 0 for s in sizes) or list(sizes) != sorted(set(sizes)):
    raise ValueError(f"model {model_cfg.name!r} reads inputs of sizes {sizes}; they must "
                     "be positive and strictly increasing (lowest first)")
  return sizes


def takes_views(model_cfg) -> bool:
  """True when the model reads a tuple of views, False for one image batch."""
  return bool(getattr(_family(model_cfg.name), "TAKES_VIEWS", False))


def data_views(image_size: int, *model_cfgs) -> tuple[int, ...] | None:
  """The views every batch must carry so that each model finds its inputs.

  None (batches carry one 'image' of `image_size`) when all models read that
  one size; otherwise the sorted union of their sizes ('views'), which ends at
  `image_size`, the size the augmented image is cropped at.
  """
  sizes = sorted({s for cfg in model_cfgs if cfg is not None for s in input_sizes(cfg)})
  if sizes[-1] != int(image_size):
    raise ValueError(f"the largest input the model(s) read is {sizes[-1]}x{sizes[-1]} "
                     f"but data.image_size={image_size}; make them equal")
  return None if sizes == [int(image_size)] else tuple(sizes)


def inputs_from_batch(model_cfg, batch: dict):
  """The model's inputs from a batch of the data contract ('image' or 'views'),
  chosen by size, so one batch can feed a student and a teacher that read
  different resolutions."""
  images = tuple(batch["views"]) if "views" in batch else (batch["image"],)
  available = {x.shape[1]: x for x in images}
  sizes = input_sizes(model_cfg)
  missing = [s for s in sizes if s not in available]
  if missing:
    raise ValueError(f"model {model_cfg.name!r} reads {sizes} images but the batch "
                     f"carries {sorted(available)}; build the data views with "
                     "models.data_views")
  chosen = tuple(available[s] for s in sizes)
  return chosen if takes_views(model_cfg) else chosen[0]


def dummy_inputs(model_cfg, batch: int = 2):
  """Zero inputs of the model's shapes (for init and eval_shape)."""
  import jax.numpy as jnp
  chosen = tuple(jnp.zeros((batch, s, s, 3), jnp.float32) for s in input_sizes(model_cfg))
  return chosen if takes_views(model_cfg) else chosen[0]


def num_exits(model_cfg) -> int:
  return len(exit_macs(model_cfg))


def module_kwargs(model_cfg, module_cls, *, config_only=("name", "image_size"),
                  label: str | None = None) -> dict:
  """Constructor kwargs of `module_cls` from a model config.

  Unknown keys raise one error listing the valid ones; keys in `config_only`
  are accepted but not passed on; a dtype given as a string becomes a dtype.
  """
  import jax.numpy as jnp
  # 'layers' is chosen by the run (models.build), never by the model config.
  fields = {f.name for f in dataclasses.fields(module_cls)} - {"parent", "name", "layers"}
  cfg = dict(model_cfg)
  unknown = set(cfg) - fields - set(config_only)
  if unknown:
    raise ValueError(f"unknown {label or module_cls.__name__} config keys {sorted(unknown)}; "
                     f"valid keys are {sorted(fields | set(config_only))}")
  kw = {k: v for k, v in cfg.items() if k in fields}
  if isinstance(kw.get("dtype"), str):
    kw["dtype"] = jnp.dtype(kw["dtype"])
  return kw


def one_image_input(model_cfg) -> tuple[int]:
  """`input_sizes` of a family that reads one image batch of model.image_size."""
  if "image_size" not in model_cfg:
    raise ValueError(f"model.image_size is missing: the {model_cfg.name} family needs "
                     "its input resolution")
  return (int(model_cfg.image_size),)


def _check_image_size(image_size: int, patch_size: int, where: str = "model") -> None:
  if image_size % patch_size:
    raise ValueError(
        f"{where}: image size {image_size} is not divisible by patch size "
        f"{patch_size}; pick an image size that is a multiple of {patch_size} "
        "or another patch size")


__all__: Sequence[str] = ("build", "exit_macs", "input_sizes", "takes_views", "data_views",
                          "inputs_from_batch", "dummy_inputs", "as_exits", "available",
                          "num_exits")
