"""Model families, looked up by name.

`model_cfg.name` names a module `adaptive_vision.models.<name>` that exposes
`build(model_cfg)` and `exit_macs(model_cfg)`; adding a family means adding a
module, with no table to edit. Every family's module returns
`(exit_logits, out)` with `exit_logits` a tuple of [B, K] arrays, cheapest exit
first (a single-exit model returns a tuple of one).
"""

from __future__ import annotations

import importlib
from typing import Any, Sequence

import jax


def _family(name: str):
  try:
    module = importlib.import_module(f"adaptive_vision.models.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"adaptive_vision.models.{name}":
      raise
    raise ValueError(
        f"unknown model.name={name!r}; use one of {available()} "
        "(each is a module in adaptive_vision/models/)") from None
  if not (hasattr(module, "build") and hasattr(module, "exit_macs")):
    raise ValueError(f"adaptive_vision.models.{name} is not a model family "
                     "(it needs build() and exit_macs())")
  return module


def available() -> list[str]:
  import pkgutil
  names = [m.name for m in pkgutil.iter_modules(__path__)]
  return sorted(n for n in names if not n.startswith("_"))


def build(model_cfg):
  """Returns the flax.linen module described by `model_cfg`."""
  return _family(model_cfg.name).build(model_cfg)


def exit_macs(model_cfg) -> list[float]:
  """Cumulative MACs per image to reach and evaluate each exit."""
  return [float(m) for m in _family(model_cfg.name).exit_macs(model_cfg)]


def as_exits(logits: Any) -> tuple[jax.Array, ...]:
  """Tuple of [B, K] exit logits from a sequence of them, one [B, K] array
  (one exit) or a stacked [E, B, K] array.

  The one place that normalises exit logits: the losses and the early-exit
  policies accept any of these forms through it.
  """
  if isinstance(logits, (tuple, list)):
    return tuple(logits)
  ndim = getattr(logits, "ndim", None)
  if ndim == 2:
    return (logits,)
  if ndim == 3:
    return tuple(logits[i] for i in range(logits.shape[0]))
  raise ValueError(f"expected [B, K] logits, [E, B, K] stacked exit logits or a "
                   f"sequence of [B, K], got {type(logits).__name__} "
                   f"of shape {getattr(logits, 'shape', None)}")


def num_exits(model_cfg) -> int:
  return len(exit_macs(model_cfg))


def module_kwargs(model_cfg, module_cls, *, config_only=("name", "image_size"),
                  label: str | None = None) -> dict:
  """Constructor kwargs of `module_cls` from a model config.

  Unknown keys raise one error listing the valid ones; keys in `config_only`
  are accepted but not passed on; a dtype given as a string becomes a dtype.
  """
  import dataclasses
  import jax.numpy as jnp
  fields = {f.name for f in dataclasses.fields(module_cls)} - {"parent", "name"}
  cfg = dict(model_cfg)
  unknown = set(cfg) - fields - set(config_only)
  if unknown:
    raise ValueError(f"unknown {label or module_cls.__name__} config keys {sorted(unknown)}; "
                     f"valid keys are {sorted(fields | set(config_only))}")
  kw = {k: v for k, v in cfg.items() if k in fields}
  if isinstance(kw.get("dtype"), str):
    kw["dtype"] = jnp.dtype(kw["dtype"])
  return kw


def _check_image_size(image_size: int, patch_size: int, where: str = "model") -> None:
  if image_size % patch_size:
    raise ValueError(
        f"{where}: image size {image_size} is not divisible by patch size "
        f"{patch_size}; pick an image size that is a multiple of {patch_size} "
        "or another patch size")


__all__: Sequence[str] = ("build", "exit_macs", "as_exits", "available", "num_exits")
