"""The jitted, sharded train step (a pure function of state and batch); the eval
step is evaluation's (adaptive_vision/eval/predict.py)."""

from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from adaptive_vision import sharding as shd
from adaptive_vision.train.state import TrainState


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
                    inputs: Callable[[dict], Any],
                    teacher: Optional[nn.Module] = None,
                    teacher_inputs: Optional[Callable[[dict], Any]] = None,
                    teacher_from_batch: bool = False):
  """Returns `step(state, batch, teacher_variables) -> (state, metrics)`.

  `inputs(batch)` (and `teacher_inputs`) pick what each model reads from the
  batch (`models.inputs_from_batch`), so the step knows no model family.
  With `teacher_from_batch` the teacher's exit logits come precomputed in
  `batch['teacher_logits']` [B, E_teacher, K] (train/teacher_cache.py).

  The teacher (frozen, eval mode) runs inside the same step on the same
  augmented batch; its outputs pass through stop_gradient so no gradient can
  reach it, and its variables are an argument, never part of the state.
  """

  def step(state: TrainState, batch: dict, teacher_variables):
    rng = jax.random.fold_in(state.rng, state.step)
    x = inputs(batch)
    teacher_logits = None
    if teacher_from_batch:
      cached = jax.lax.stop_gradient(batch["teacher_logits"])
      teacher_logits = tuple(cached[:, e] for e in range(cached.shape[1]))
    elif teacher is not None:
      t_logits, _ = teacher.apply(teacher_variables, teacher_inputs(batch), train=False)
      teacher_logits = jax.lax.stop_gradient(_exits(t_logits, "teacher"))

    def loss_of(params):
      variables = _variables(params, state.batch_stats)
      if state.batch_stats:
        (logits, _), new_vars = model.apply(variables, x, train=True,
                                            rngs={"dropout": rng},
                                            mutable=["batch_stats"])
        batch_stats = new_vars["batch_stats"]
      else:
        logits, _ = model.apply(variables, x, train=True, rngs={"dropout": rng})
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


def jit_train_step(step, mesh, state_sharding, teacher_sharding=None, *, jit=jax.jit):
  """`step` jitted over `mesh` (with `jit`, e.g. a backend's `Backend.jit`)."""
  batch = shd.batch_sharding(mesh)
  return jit(step, in_shardings=(state_sharding, batch, teacher_sharding),
                      out_shardings=(state_sharding, shd.replicated(mesh)),
                      donate_argnums=(0,))
