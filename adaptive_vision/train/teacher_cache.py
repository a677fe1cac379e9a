"""The frozen teacher's logits of each training batch, computed once per data stream.

A distillation student's step runs the teacher's forward pass on the same
augmented batch; on a CPU that is about half of the step. The batch of step i
is a pure function of (data config, seed, batch size, process), and the
teacher is frozen, so students that share those (the ce / kd / erde students of
one seed, and the entropy-term ablations) can share the teacher's logits too:
the first run to reach step i computes and stores them, the others read them.

One file per step (`<step>.npy`, [local batch, teacher exits, classes],
float32), written atomically, in a folder named by a hash of everything the
logits depend on (`key.json` beside them says what). Logits computed by the
teacher's forward compiled on its own may differ from the in-step forward in
the last float32 bits; every student that uses the cache sees the same ones.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional

import numpy as np

from adaptive_vision import atomic, export


class TeacherLogitsCache:
  """get(step) -> logits or None; put(step, logits)."""

  def __init__(self, root: str, key: dict[str, Any]):
    text = json.dumps(key, sort_keys=True, default=str)
    self.dir = os.path.join(root, hashlib.sha256(text.encode()).hexdigest()[:16])
    os.makedirs(self.dir, exist_ok=True)
    key_path = os.path.join(self.dir, "key.json")
    if not os.path.exists(key_path):
      atomic.write_text(key_path, text)

  def _path(self, step: int) -> str:
    return os.path.join(self.dir, f"{int(step):08d}.npy")

  def get(self, step: int) -> Optional[np.ndarray]:
    path = self._path(step)
    if not os.path.exists(path):
      return None
    try:
      return np.load(path)
    except (OSError, ValueError):  # unreadable: compute again (and overwrite)
      return None

  def put(self, step: int, logits: np.ndarray) -> None:
    with atomic.replace(self._path(step), "wb") as f:
      np.save(f, np.asarray(logits, np.float32))


def cache_root(config) -> Optional[str]:
  """config.teacher_cache: '' (off), 'auto' or a folder. 'auto' is
  <teacher.checkpoint>/logits_cache for a teacher run, and for a teacher
  parameters file (.npz) a folder named after it in the data cache root
  (a results folder is no place for a cache)."""
  value = config.teacher_cache
  if not value or not config.teacher:
    return None
  if value != "auto":
    return value
  where = str(config.teacher.checkpoint)
  if export.is_params_file(where):
    from adaptive_vision.data import sources  # pylint: disable=import-outside-toplevel
    name = os.path.splitext(os.path.basename(where))[0]
    return os.path.join(str(sources.cache_root(config.data)), "teacher_logits", name)
  return os.path.join(where, "logits_cache")


def fingerprint(variables) -> str:
  """sha256 of every array of a variables tree (the teacher's identity)."""
  import jax
  h = hashlib.sha256()
  for path, x in jax.tree_util.tree_flatten_with_path(variables)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(np.asarray(x)).tobytes())
  return h.hexdigest()


def cache_key(config, teacher_variables, views, process_index: int, process_count: int) -> dict:
  """Everything the logits of step i depend on: the teacher (its arrays and
  model) and the data stream (data config without operational fields, seed,
  batch size, views, process)."""
  data = json.loads(config.data.to_json_best_effort())
  for k in ("num_workers", "prefetch_buffer_size", "cache_dir"):
    data.pop(k, None)
  return {"teacher": fingerprint(teacher_variables),
          "teacher_model": json.loads(config.teacher.model.to_json_best_effort()),
          "data": data, "seed": int(config.seed), "batch_size": int(config.batch_size),
          "views": list(views) if views else None,
          "process": [int(process_index), int(process_count)]}
