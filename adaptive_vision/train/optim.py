"""Optimizers and learning-rate schedules from `config.optim`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

_VALID = {"name", "lr", "weight_decay", "b1", "b2", "eps", "momentum", "nesterov",
          "warmup_steps", "warmup_fraction", "schedule", "end_lr_factor",
          "grad_clip", "wd_mask"}


def make_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
  lr = float(optim_cfg.lr)
  warmup = int(optim_cfg.get("warmup_steps") or 0)
  if not warmup and optim_cfg.get("warmup_fraction"):
    warmup = int(round(optim_cfg.warmup_fraction * total_steps))
  warmup = min(warmup, max(total_steps - 1, 0))
  kind = optim_cfg.get("schedule", "cosine")
  end = lr * float(optim_cfg.get("end_lr_factor", 0.0))
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
  wd = float(optim_cfg.get("weight_decay", 0.0))
  mask = lambda p: weight_decay_mask(p, optim_cfg.get("wd_mask", "kernels"))
  name = optim_cfg.get("name", "adamw")
  if name == "adamw":
    core = optax.adamw(schedule, b1=optim_cfg.get("b1", 0.9), b2=optim_cfg.get("b2", 0.999),
                       eps=optim_cfg.get("eps", 1e-8), weight_decay=wd, mask=mask)
  elif name == "sgd":
    # Coupled L2 (added to the gradient before momentum), as in the ResNet papers.
    core = optax.chain(
        optax.add_decayed_weights(wd, mask) if wd else optax.identity(),
        optax.sgd(schedule, momentum=optim_cfg.get("momentum", 0.9),
                  nesterov=optim_cfg.get("nesterov", True)))
  else:
    raise ValueError(f"optim.name={name!r}; use 'adamw' or 'sgd'")
  clip = optim_cfg.get("grad_clip")
  if clip:
    core = optax.chain(optax.clip_by_global_norm(float(clip)), core)
  return core, schedule
