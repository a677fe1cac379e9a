"""build(config, mesh): the one place a trainer is assembled.

The loop, `launch.evaluate`, the benchmarks and the tests all call it, so the
step they time or test is the step that trains. It knows no model family by
name: inputs come from `models.input_sizes` / `models.inputs_from_batch`, the
data views every batch carries from `models.data_views`, the loss from
`losses.loss_from_config`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from adaptive_vision import backend as backend_lib
from adaptive_vision import data as data_lib
from adaptive_vision import export as export_lib
from adaptive_vision import losses, models
from adaptive_vision import sharding as shd
from adaptive_vision.eval import predict as eval_predict
from adaptive_vision.config import require
from adaptive_vision.train import checkpointing, optim, steps
from adaptive_vision.train import teacher_cache as teacher_cache_lib
from adaptive_vision.train.state import TrainState


@dataclasses.dataclass(frozen=True)
class Trainer:
  """Everything a run needs, built once from its config.

  `train_step(state, batch, teacher_variables) -> (state, metrics)` and
  `eval_step(params, batch_stats, batch) -> exit logits [E, B, K]` are jitted
  over `mesh` with the state's shardings (the state donated);
  `train_step_fn` is the same step as a pure, un-jitted function (to
  transform or inspect); `views` is what the data pipeline must emit (None:
  one 'image').
  """
  config: Any
  mesh: jax.sharding.Mesh
  backend: backend_lib.Backend
  model: nn.Module
  views: Optional[tuple[int, ...]]
  total_steps: int
  tx: Any
  schedule: Callable
  loss_fn: Callable
  init_fn: Callable
  abstract_state: TrainState
  state_sharding: TrainState
  train_step: Optional[Callable]
  train_step_fn: Optional[Callable]
  eval_step: Callable
  teacher: Optional[nn.Module]
  teacher_variables: Any
  teacher_forward: Optional[Callable] = None
  teacher_cache: Optional[teacher_cache_lib.TeacherLogitsCache] = None

  def prepare_batch(self, local: dict, step: int) -> dict:
    """The global batch of training step `step` from this process's local
    batch; with a teacher cache, with the teacher's logits of that step
    (read from the cache, or computed and stored)."""
    if self.teacher_cache is None:
      return shd.global_batch(local, self.mesh)
    logits = self.teacher_cache.get(step)
    if logits is None:
      logits = np.asarray(self.teacher_forward(self.teacher_variables,
                                               shd.global_batch(local, self.mesh)))
      self.teacher_cache.put(step, logits)
    return shd.global_batch(dict(local, teacher_logits=logits), self.mesh)

  def init_state(self, rng=None) -> TrainState:
    """A fresh train state, initialized directly in its shardings."""
    rng = jax.random.PRNGKey(self.config.seed) if rng is None else rng
    return jax.jit(self.init_fn, out_shardings=self.state_sharding)(rng)

  def place_variables(self, variables: dict) -> tuple[Any, Any]:
    """(params, batch_stats) of restored variables, laid out like the state's."""
    params = jax.device_put(variables["params"], self.state_sharding.params)
    stats = variables.get("batch_stats", {})
    return params, jax.device_put(stats, self.state_sharding.batch_stats)

  def restore_target(self) -> TrainState:
    """The abstract state with its shardings: what a checkpoint restores into,
    re-laid out for this mesh whatever mesh wrote it."""
    return jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
        self.abstract_state, self.state_sharding)

  def signature(self) -> dict:
    """What a workdir's checkpoints must match (model config, parameter shapes)."""
    return {"model": json.loads(self.config.model.to_json_best_effort()),
            "params": checkpointing.shapes_of(self.abstract_state.params)}

  def train_iterator(self):
    return data_lib.make_train_iterator(
        self.config.data, global_batch_size=self.config.batch_size, seed=self.config.seed,
        views=self.views, process_index=jax.process_index(),
        process_count=jax.process_count())


def data_views(config) -> Optional[tuple[int, ...]]:
  """The views batches carry for the model (and its teacher), derived once."""
  teacher = require(config, "teacher")
  return models.data_views(config.data.image_size, config.model,
                           teacher.model if teacher else None)


def schedule_steps(config, train_size: Optional[int] = None) -> int:
  """config.total_steps, else num_epochs full epochs of the train split."""
  total = int(require(config, "total_steps"))
  if total:
    return total
  if train_size is None:
    train_size = data_lib.dataset_info(config.data)["train_size"]
  return int(config.num_epochs) * max(train_size // config.batch_size, 1)


def make_init_fn(model: nn.Module, tx, model_cfg) -> Callable:
  def init(rng):
    p_rng, d_rng, s_rng = jax.random.split(rng, 3)
    variables = model.init({"params": p_rng, "dropout": d_rng},
                           models.dummy_inputs(model_cfg), train=False)
    params = variables["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=tx.init(params),
                      batch_stats=variables.get("batch_stats", {}), rng=s_rng)
  return init


def load_teacher(teacher_cfg, variables=None, layers=None) -> tuple[nn.Module, dict]:
  """(frozen teacher module, its variables) from teacher.checkpoint (a run's
  workdir, or a parameters file of launch.export: a trained teacher travels as
  one file), or from `variables` given directly (benchmarks); shapes are
  checked either way."""
  teacher = models.build(teacher_cfg.model, layers=layers)
  where = "the given teacher variables"
  if variables is None and export_lib.is_params_file(teacher_cfg.checkpoint):
    where = f"teacher params file {teacher_cfg.checkpoint}"
    variables, meta = export_lib.read(teacher_cfg.checkpoint)
    # The model only: a teacher's eval preprocessing is not the student's concern.
    export_lib.check_matches({"model": meta.get("model", {})}, variables,
                             ml_collections.ConfigDict({"model": teacher_cfg.model}), where)
  elif variables is None:
    variables = checkpointing.restore_variables(teacher_cfg.checkpoint,
                                                hint=checkpointing.TEACHER_HINT)
    where = f"teacher checkpoint {teacher_cfg.checkpoint}"
  expected = jax.eval_shape(
      lambda: teacher.init({"params": jax.random.PRNGKey(0)},
                           models.dummy_inputs(teacher_cfg.model), train=False))
  want = checkpointing.shapes_of({k: expected[k] for k in variables if k in expected})
  got = checkpointing.shapes_of(variables)
  if want != got or set(expected) - set(variables):
    bad = sorted(k for k in set(want) | set(got) if want.get(k) != got.get(k))
    raise ValueError(f"{where} does not match teacher.model (first differences: "
                     f"{bad[:3]}); point teacher.checkpoint at a run of the same "
                     "model config")
  return teacher, variables


def build(config, mesh: Optional[jax.sharding.Mesh] = None, *,
          total_steps: Optional[int] = None, train_size: Optional[int] = None,
          teacher_variables: Optional[dict] = None) -> Trainer:
  """Assembles the trainer of `config` on `mesh` (default: the config's mesh).

  `total_steps` sets the learning-rate schedule's length (default: from the
  config and the train split's size, `train_size` if given). With a teacher
  configured, its variables are restored from teacher.checkpoint unless
  `teacher_variables` are given. Evaluation needs no trainer:
  `adaptive_vision.eval.predict.evaluate`.
  """
  mesh = shd.make_mesh(require(config, "mesh")) if mesh is None else mesh
  be = backend_lib.choose(require(config, "backend"), mesh, "train")
  model = models.build(config.model, layers=be.layers)
  views = data_views(config)
  total = schedule_steps(config, train_size) if total_steps is None else int(total_steps)
  tx, schedule = optim.make_optimizer(config.optim, total)
  loss_fn = losses.loss_from_config(config.loss)
  init_fn = make_init_fn(model, tx, config.model)
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(config.seed))
  state_sharding = shd.state_shardings(abstract, mesh, require(config, "param_sharding"))

  teacher, teacher_inputs, t_vars = None, None, None
  forward, cache = None, None
  if require(config, "teacher"):
    teacher, t_vars = load_teacher(config.teacher, teacher_variables, be.layers)
    teacher_inputs = functools.partial(models.inputs_from_batch, config.teacher.model)
    root = teacher_cache_lib.cache_root(config)
    if root:
      if jax.process_count() > 1:
        raise ValueError("teacher_cache works in one process; set --config.teacher_cache= "
                         "(empty) to run the teacher inside the step")
      cache = teacher_cache_lib.TeacherLogitsCache(root, teacher_cache_lib.cache_key(
          config, t_vars, views, jax.process_index(), jax.process_count()))
      forward = be.jit(
          lambda tv, b: jnp.stack(teacher.apply(tv, teacher_inputs(b), train=False)[0], 1),
          in_shardings=(shd.replicated(mesh), shd.batch_sharding(mesh)),
          out_shardings=shd.batch_sharding(mesh))
    t_vars = jax.device_put(t_vars, shd.replicated(mesh))
  inputs = functools.partial(models.inputs_from_batch, config.model)
  step_fn = steps.make_train_step(model, tx, loss_fn, schedule, inputs=inputs,
                                  teacher=None if cache else teacher,
                                  teacher_inputs=teacher_inputs,
                                  teacher_from_batch=cache is not None)
  train_step = steps.jit_train_step(
      step_fn, mesh, state_sharding,
      jax.tree_util.tree_map(lambda _: shd.replicated(mesh), t_vars), jit=be.jit)
  eval_step = eval_predict.jit_eval_step(eval_predict.make_eval_step(model, inputs=inputs),
                                         mesh, state_sharding.params,
                                         state_sharding.batch_stats, jit=be.jit)
  return Trainer(config=config, mesh=mesh, backend=be, model=model, views=views, total_steps=total,
                 tx=tx, schedule=schedule, loss_fn=loss_fn, init_fn=init_fn,
                 abstract_state=abstract, state_sharding=state_sharding,
                 train_step=train_step, train_step_fn=step_fn, eval_step=eval_step, teacher=teacher,
                 teacher_variables=t_vars, teacher_forward=forward, teacher_cache=cache)

