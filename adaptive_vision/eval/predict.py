"""Per-exit logits of a model on data splits: evaluation without the trainer.

    results = predict.evaluate(config, variables)          # {split: (logits, labels)}
    predict.write_logits(folder, results, models.exit_macs(config.model))

`evaluate` takes a model's config (model, data, eval batch size, backend
switches) and its variables and needs nothing of training (no optimizer,
schedule or loss): `launch.evaluate`, `launch.export` and the training loop's
own evaluation all run it.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from adaptive_vision import backend as backend_lib
from adaptive_vision import data as data_lib
from adaptive_vision import models
from adaptive_vision import sharding as shd
from adaptive_vision.config import require


def make_eval_step(model, *, inputs: Callable[[dict], Any]):
  """Returns `step(params, batch_stats, batch) -> exit logits [E, B, K]` (float32)."""

  def step(params, batch_stats, batch):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
    logits, _ = model.apply(variables, inputs(batch), train=False)
    if not isinstance(logits, tuple):
      raise TypeError(f"the model returned {type(logits).__name__} logits; every model "
                      "family returns (exit_logits, out) with exit_logits a tuple of "
                      "[B, K] arrays (see adaptive_vision/models/__init__.py)")
    return jnp.stack([l.astype(jnp.float32) for l in logits])

  return step


def jit_eval_step(step, mesh, params_sharding, stats_sharding, *, jit=jax.jit):
  """`step` jitted over `mesh`, the batch split over its data axis."""
  return jit(step, in_shardings=(params_sharding, stats_sharding, shd.batch_sharding(mesh)),
             out_shardings=jax.sharding.NamedSharding(
                 mesh, jax.sharding.PartitionSpec(None, shd.DATA)))


def evaluate(config, variables: dict, *, mesh=None, splits=("val", "test"),
             backend: Optional[backend_lib.Backend] = None, model=None,
             eval_step=None) -> dict:
  """{split: (exit_logits [E, N, K], labels [N])} of `variables` (params, and
  batch_stats if any) for the model of `config`, in each split's example
  order, on `mesh` (default: the config's), for any number of processes.

  `backend` (default: chosen from config.backend and the mesh), `model` and
  `eval_step` (jitted, e.g. the trainer's) may be given to reuse what a
  caller already built.
  """
  mesh = shd.make_mesh(require(config, "mesh")) if mesh is None else mesh
  if eval_step is None:
    if model is None:
      backend = backend or backend_lib.choose(require(config, "backend"), mesh, "train")
      model = models.build(config.model, layers=backend.layers)
    jit = backend.jit if backend is not None else jax.jit
    shardings = shd.state_shardings({"params": variables["params"],
                                     "batch_stats": variables.get("batch_stats", {})},
                                    mesh, require(config, "param_sharding"))
    step = make_eval_step(model, inputs=functools.partial(models.inputs_from_batch,
                                                          config.model))
    eval_step = jit_eval_step(step, mesh, shardings["params"], shardings["batch_stats"],
                              jit=jit)
    variables = jax.device_put({"params": variables["params"],
                                "batch_stats": variables.get("batch_stats", {})}, shardings)
  params, stats = variables["params"], variables.get("batch_stats", {})
  views = models.data_views(config.data.image_size, config.model)
  return {split: evaluate_split(config, eval_step, params, stats, split, mesh, views)
          for split in splits}


def write_logits(folder: str, results: dict, exit_macs) -> list[str]:
  """`<split>_logits.npz` in `folder` for each split of `evaluate`'s results
  (the logits file contract); returns the paths."""
  from adaptive_vision.eval import logits as logits_lib
  os.makedirs(folder, exist_ok=True)
  paths = []
  for split, (logits, labels) in results.items():
    path = os.path.join(folder, f"{split}_logits.npz")
    logits_lib.save_logits(path, logits, labels, np.asarray(exit_macs))
    paths.append(path)
  return paths


def predict_exits(eval_step, params, batch_stats, batches, mesh) -> tuple[np.ndarray, np.ndarray]:
  """Runs a jitted eval step over an eval iterator.

  Returns (exit_logits [E, N, K] float32, labels [N]) with padding removed;
  in multi-process runs every process gets all examples.
  """
  logits, labels = [], []
  for batch in batches:
    mask = np.asarray(batch["mask"])
    out = eval_step(params, batch_stats, shd.global_batch(
        {k: v for k, v in batch.items() if k != "mask"}, mesh))
    meta = {"label": np.asarray(batch["label"]), "mask": mask}
    if jax.process_count() > 1:
      out = multihost_utils.process_allgather(out, tiled=True)
      meta = multihost_utils.process_allgather(meta, tiled=True)
      # allgather(tiled) concatenates per-process slices on axis 0; logits are [E, B, K]
    out = np.asarray(out)
    keep = np.asarray(meta["mask"]) > 0
    logits.append(out[:, keep])
    labels.append(np.asarray(meta["label"])[keep])
  if not logits:
    raise ValueError("the eval split is empty")
  return np.concatenate(logits, axis=1), np.concatenate(labels)


def evaluate_split(config, eval_step, params, batch_stats, split: str, mesh,
                   views) -> tuple[np.ndarray, np.ndarray]:
  """(exit_logits [E, N, K], labels [N]) of `split` in the split's example
  order, for any number of processes (so logits files of runs on different
  topologies line up). `eval_step`: jitted `make_eval_step`; `views`: what
  the batches carry (`models.data_views`)."""
  global_batch = require(config, "eval_batch_size")
  # Eval batches are padded anyway, so round up to what the mesh can split.
  shards = mesh.shape[shd.DATA]
  global_batch = -(-global_batch // shards) * shards
  it = data_lib.make_eval_iterator(
      config.data, split, global_batch_size=global_batch, views=views,
      process_index=jax.process_index(), process_count=jax.process_count())
  logits, labels = predict_exits(eval_step, params, batch_stats, it, mesh)
  if jax.process_count() > 1:
    order = np.argsort(gathered_example_index(len(labels), global_batch, jax.process_count()))
    logits, labels = logits[:, order], labels[order]
  return logits, labels


def gathered_example_index(n: int, global_batch: int, process_count: int) -> np.ndarray:
  """Example index of each row predict_exits returns in a multi-process run.

  Process p reads examples p, p + P, p + 2P, ... (make_eval_iterator), so row
  p * L + j of global batch b (L = local batch) is example b * G + j * P + p;
  padding (index >= n) was dropped.
  """
  local = global_batch // process_count
  b, p, j = np.meshgrid(np.arange(-(-n // global_batch)), np.arange(process_count),
                        np.arange(local), indexing="ij")
  index = (b * global_batch + j * process_count + p).reshape(-1)
  return index[index < n]


def exit_accuracies(exit_logits: np.ndarray, labels: np.ndarray) -> list[float]:
  return [float(np.mean(np.argmax(l, -1) == labels)) for l in exit_logits]
