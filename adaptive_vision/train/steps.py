"""Jitted, sharded train and eval steps (pure functions of state and batch)."""

from __future__ import annotations

from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from adaptive_vision.train import sharding as shd
from adaptive_vision.train.state import TrainState


def model_inputs(batch: dict, multi_resolution: bool):
  """What the model consumes: the tuple of views (cascades) or one image batch."""
  if multi_resolution:
    if "views" not in batch:
      raise ValueError("a multi-resolution model needs data.resolutions set so "
                       "batches carry 'views'")
    return tuple(batch["views"])
  return batch["image"] if "image" in batch else batch["views"][-1]


def _exits(logits, who: str) -> tuple:
  """The model family contract: exit logits are a tuple of [B, K] arrays."""
  if not isinstance(logits, tuple):
    raise TypeError(f"the {who} returned {type(logits).__name__} logits; every model "
                    "family returns (exit_logits, out) with exit_logits a tuple of "
                    "[B, K] arrays (see adaptive_vision/models/__init__.py)")
  return logits


def _variables(params, batch_stats):
  variables = {"params": params}
  if batch_stats:
    variables["batch_stats"] = batch_stats
  return variables


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    loss_fn: Callable, schedule: Callable, *,
                    multi_resolution: bool = False,
                    teacher: Optional[nn.Module] = None,
                    teacher_multi_resolution: bool = False):
  """Returns `step(state, batch, teacher_variables) -> (state, metrics)`.

  The teacher (frozen, eval mode) runs inside the same step on the same
  augmented batch; its outputs pass through stop_gradient so no gradient can
  reach it, and its variables are an argument, never part of the state.
  """

  def step(state: TrainState, batch: dict, teacher_variables):
    rng = jax.random.fold_in(state.rng, state.step)
    inputs = model_inputs(batch, multi_resolution)
    teacher_logits = None
    if teacher is not None:
      t_logits, _ = teacher.apply(teacher_variables,
                                  model_inputs(batch, teacher_multi_resolution),
                                  train=False)
      teacher_logits = jax.lax.stop_gradient(_exits(t_logits, "teacher"))

    def loss_of(params):
      variables = _variables(params, state.batch_stats)
      if state.batch_stats:
        (logits, _), new_vars = model.apply(variables, inputs, train=True,
                                            rngs={"dropout": rng},
                                            mutable=["batch_stats"])
        batch_stats = new_vars["batch_stats"]
      else:
        logits, _ = model.apply(variables, inputs, train=True, rngs={"dropout": rng})
        batch_stats = state.batch_stats
      loss, metrics = loss_fn(_exits(logits, "model"), batch["label"], teacher_logits)
      return loss, (metrics, batch_stats)

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(
        loss_of, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    param_norm = optax.tree.norm(params)
    metrics = dict(metrics, loss=loss, grad_norm=grad_norm, param_norm=param_norm,
                   lr=schedule(state.step),
                   finite=jnp.isfinite(loss) & jnp.isfinite(grad_norm)
                   & jnp.isfinite(param_norm))
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state, batch_stats=batch_stats)
    return new_state, metrics

  return step


def make_eval_step(model: nn.Module, *, multi_resolution: bool = False):
  """Returns `step(params, batch_stats, batch) -> exit logits [E, B, K]`."""

  def step(params, batch_stats, batch):
    logits, _ = model.apply(_variables(params, batch_stats),
                            model_inputs(batch, multi_resolution), train=False)
    return jnp.stack([l.astype(jnp.float32) for l in _exits(logits, "model")])

  return step


def jit_train_step(step, mesh, state_sharding, teacher_sharding=None):
  batch = shd.batch_sharding(mesh)
  return jax.jit(step, in_shardings=(state_sharding, batch, teacher_sharding),
                 out_shardings=(state_sharding, shd.replicated(mesh)),
                 donate_argnums=(0,))


def jit_eval_step(step, mesh, params_sharding, stats_sharding):
  return jax.jit(step, in_shardings=(params_sharding, stats_sharding,
                                     shd.batch_sharding(mesh)),
                 out_shardings=jax.sharding.NamedSharding(
                     mesh, jax.sharding.PartitionSpec(None, shd.DATA)))
