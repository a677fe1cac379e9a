"""Orbax checkpoints of the train state and the data iterator.

Saves are asynchronous; a step directory only becomes visible once complete
(Orbax writes to a temporary name and renames), so a run killed mid-save
leaves the previous checkpoints intact. Restore takes the newest checkpoint
that loads; a damaged one is moved aside (never deleted) with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    return self.manager.save(int(step), args=ocp.args.Composite(**items), force=force)

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()

  def _set_aside(self, step: int, error: Exception):
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.damaged-{int(time.time())}"
    if jax.process_index() == 0 and os.path.exists(src):
      os.rename(src, dst)
    self.manager.close()
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)
    return dst

  def restore(self, abstract_state, data_iterator=None) -> Optional[tuple[int, Any]]:
    """(step, state) from the newest checkpoint that loads, or None if there is none.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings; the
    iterator (if given) is set to the saved position.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    for i, step in enumerate(steps):
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return step, restored["state"]
      except Exception as e:  # a truncated or partly deleted checkpoint
        older = steps[i + 1] if i + 1 < len(steps) else None
        moved = self._set_aside(step, e)
        log.warning("checkpoint at step %d is damaged (%s: %s); moved it to %s and "
                    "falling back to %s", step, type(e).__name__, str(e)[:200], moved,
                    f"step {older}" if older is not None else "a fresh start")
    return None


def restore_variables(directory: str, step: Optional[int] = None) -> dict:
  """Params (and batch_stats) of a run's checkpoint, e.g. a distillation teacher.

  Reads only; raises FileNotFoundError naming the directory when there is no
  checkpoint there.
  """
  directory = os.path.abspath(directory)
  if os.path.basename(directory) != "checkpoints" and os.path.isdir(
      os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(
        f"no checkpoint directory at {directory}; train the teacher first "
        "(python -m launch.train --config ... --workdir DIR) and point "
        "teacher.checkpoint at DIR")
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  with ocp.CheckpointManager(directory, options=options) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"{directory} holds no complete checkpoint; "
                              "train the teacher first")
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore()))
  state = restored["state"]
  get = state.get if isinstance(state, dict) else lambda k, d=None: getattr(state, k, d)
  variables = {"params": get("params")}
  if get("batch_stats"):
    variables["batch_stats"] = get("batch_stats")
  return variables


def shapes_of(tree) -> dict:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): list(np.shape(x)) for p, x in flat}


def check_signature(workdir: str, signature: dict, *, write: bool) -> None:
  """Refuses a workdir whose checkpoints belong to a different model."""
  path = os.path.join(workdir, "model_signature.json")
  if os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    if old != json.loads(json.dumps(signature)):
      diff = sorted(k for k in set(old.get("params", {})) | set(signature.get("params", {}))
                    if old.get("params", {}).get(k) != signature.get("params", {}).get(k))
      raise ValueError(
          f"workdir {workdir} holds checkpoints of a different model (first "
          f"differing parameters: {diff[:3]}); use a new --workdir, or delete "
          "that workdir to start over")
  elif write and jax.process_index() == 0:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(signature, f, indent=1, sort_keys=True)
    os.replace(tmp, path)
