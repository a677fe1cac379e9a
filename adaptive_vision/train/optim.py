"""Optimizers and learning-rate schedules from `config.optim`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from adaptive_vision.config import require

_VALID = {"name", "lr", "weight_decay", "b1", "b2", "eps", "momentum", "nesterov",
          "warmup_steps", "warmup_fraction", "schedule", "end_lr_factor",
          "grad_clip", "wd_mask"}


def _read(optim_cfg, key: str):
  return require(optim_cfg, key, "optim")


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  lr = float(_read(optim_cfg, "lr"))
  warmup = int(_read(optim_cfg, "warmup_steps") or 0)
  fraction = _read(optim_cfg, "warmup_fraction")
  if not warmup and fraction:
    warmup = int(round(fraction * total_steps))
  warmup = min(warmup, max(total_steps - 1, 0))
  kind = _read(optim_cfg, "schedule")
  end = lr * float(_read(optim_cfg, "end_lr_factor"))
  if kind == "cosine":
    decay = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1), alpha=end / lr if lr else 0.0)
  elif kind == "constant":
    decay = optax.constant_schedule(lr)
  elif kind == "linear":
    decay = optax.linear_schedule(lr, end, max(total_steps - warmup, 1))
  else:
    raise ValueError(f"optim.schedule={kind!r}; use 'cosine', 'linear' or 'constant'")
  if not warmup:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def weight_decay_mask(params, mode: str = "kernels"):
  """Which parameters decay: 'kernels' (matrices and conv kernels only: no biases,
  norms, position embeddings or class tokens), 'all' or 'none'."""
  if mode == "all":
    return jax.tree_util.tree_map(lambda _: True, params)
  if mode == "none":
    return jax.tree_util.tree_map(lambda _: False, params)
  if mode != "kernels":
    raise ValueError(f"optim.wd_mask={mode!r}; use 'kernels', 'all' or 'none'")

  def decays(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    return name == "kernel" and jnp.ndim(leaf) > 1
  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(optim_cfg, total_steps: int):
  """Returns (optax transformation, schedule)."""
  unknown = set(optim_cfg) - _VALID
  if unknown:
    raise ValueError(f"unknown optim keys {sorted(unknown)}; valid: {sorted(_VALID)}")
  schedule = make_schedule(optim_cfg, total_steps)
  read = lambda key: _read(optim_cfg, key)
  wd = float(read("weight_decay"))
  wd_mask = read("wd_mask")
  mask = lambda p: weight_decay_mask(p, wd_mask)
  name = read("name")
  if name == "adamw":
    core = optax.adamw(schedule, b1=read("b1"), b2=read("b2"), eps=read("eps"),
                       weight_decay=wd, mask=mask)
  elif name == "sgd":
    # Coupled L2 (added to the gradient before momentum), as in the ResNet papers.
    core = optax.chain(
        optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
        optax.sgd(schedule, momentum=read("momentum"), nesterov=read("nesterov")))
  else:
    raise ValueError(f"optim.name={name!r}; use 'adamw' or 'sgd'")
  clip = read("grad_clip")
  if clip:
    core = optax.chain(optax.clip_by_global_norm(float(clip)), core)
  return core, schedule
