"""Per-exit logits of a model on a data split."""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from adaptive_vision.train import sharding as shd


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


def exit_accuracies(exit_logits: np.ndarray, labels: np.ndarray) -> list[float]:
  return [float(np.mean(np.argmax(l, -1) == labels)) for l in exit_logits]
