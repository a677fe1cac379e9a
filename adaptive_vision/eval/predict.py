"""Per-exit logits of a model on a data split."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from adaptive_vision import data as data_lib
from adaptive_vision import sharding as shd
from adaptive_vision.config import require


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


def evaluate_split(trainer, params, batch_stats, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(exit_logits [E, N, K], labels [N]) of `split` in the split's example
  order, for any number of processes (so logits files of runs on different
  topologies line up). `trainer`: a `train.build.Trainer` (its config, mesh,
  eval step and data views)."""
  config, mesh = trainer.config, trainer.mesh
  global_batch = require(config, "eval_batch_size")
  # Eval batches are padded anyway, so round up to what the mesh can split.
  shards = mesh.shape[shd.DATA]
  global_batch = -(-global_batch // shards) * shards
  it = data_lib.make_eval_iterator(
      config.data, split, global_batch_size=global_batch, views=trainer.views,
      process_index=jax.process_index(), process_count=jax.process_count())
  logits, labels = predict_exits(trainer.eval_step, params, batch_stats, it, mesh)
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
