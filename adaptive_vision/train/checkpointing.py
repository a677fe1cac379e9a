"""Orbax checkpoints of the train state and the data iterator.

Saves are asynchronous; a step directory only becomes visible once complete
(Orbax writes to a temporary name and renames), so a run killed mid-save
leaves the previous checkpoints intact (and a temporary directory that the
next start removes). Restore takes the newest checkpoint that loads; newer
damaged ones are moved aside (never deleted) with a warning; when none loads
it raises CheckpointRestoreError and touches nothing.
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
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
        # A run killed mid-save leaves `<step>.orbax-checkpoint-tmp-*`; drop those.
        cleanup_tmp_directories=True)
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

  def _set_aside(self, step: int) -> str:
    src = os.path.join(self.directory, str(step))
    dst = f"{src}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while os.path.exists(dst + (f"-{n}" if n > 1 else "")):
      n += 1
    dst += f"-{n}" if n > 1 else ""
    if jax.process_index() == 0 and os.path.exists(src):
      os.rename(src, dst)
    return dst

  def _reopen(self):
    if jax.process_count() > 1:  # every process must see the renames before rescanning
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("checkpointing: damaged checkpoints moved")
    self.manager.close()
    self.manager = ocp.CheckpointManager(self.directory, options=self._options)

  def restore(self, abstract_state, data_iterator=None) -> Optional[tuple[int, Any]]:
    """(step, state) from the newest checkpoint that loads, or None if there is none.

    `abstract_state` is a pytree of jax.ShapeDtypeStruct with shardings; the
    iterator (if given) is set to the saved position.

    Checkpoints newer than the one that loads are damaged (truncated or partly
    deleted files): they are moved aside to `<step>.damaged-<time>` (never
    deleted), with a warning naming both steps, so a restart does not trip on
    them again. If checkpoints exist but none loads, nothing is moved and
    CheckpointRestoreError says why: that is a config that no longer matches
    the saved state (e.g. another optimizer) or damage to every checkpoint,
    and training from scratch over them would silently lose the run.
    """
    steps = sorted(self.manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
      items = {"state": ocp.args.StandardRestore(abstract_state)}
      if data_iterator is not None:
        items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
      try:
        restored, error = self.manager.restore(step, args=ocp.args.Composite(**items)), None
      except Exception as e:  # pylint: disable=broad-except
        restored, error = None, e
      if not _on_all_processes(error is None):
        # In multi-process runs a checkpoint counts only if every process read
        # its part, so all processes resume from the same step.
        failures.append((step, error or RuntimeError("another process could not read it")))
        continue
      for bad, error in failures:
        moved = self._set_aside(bad)
        msg = (f"checkpoint at step {bad} is damaged ({type(error).__name__}: "
               f"{' '.join(str(error).split())[:200]}); moved it to {moved} and "
               f"resumed from the checkpoint at step {step}")
        log.warning(msg)
      if failures:
        self._reopen()
      return step, restored["state"]
    if failures:
      step, error = failures[0]
      raise CheckpointRestoreError(
          f"none of the checkpoints {[s for s, _ in failures]} in {self.directory} "
          f"loads (step {step}: {type(error).__name__}: "
          f"{' '.join(str(error).split())[:300]}). If the config changed since they "
          "were written (optimizer, model), use the original config or a new "
          "--workdir; if they are damaged, move them out of the way to start over")
    return None


class CheckpointRestoreError(ValueError):
  """Checkpoints exist but none of them restores."""


def _on_all_processes(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.array([ok]))))


TEACHER_HINT = ("train the teacher first (python -m launch.train --config ... --workdir DIR) "
                "and point teacher.checkpoint at DIR")


def restore_variables(directory: str, step: Optional[int] = None, *,
                      hint: str = "train a run there first (python -m launch.train "
                                  "--config ... --workdir DIR)") -> dict:
  """Params (and batch_stats) of a run's checkpoint, e.g. a distillation teacher.

  Reads only the `state` item of the step (not the data iterator, whose
  handler is the trainer's business). When there is no checkpoint, raises
  FileNotFoundError naming the directory and ending with `hint`: how to make
  one, in the words of the command that asked (a teacher, an evaluation).
  """
  directory = os.path.abspath(directory)
  if os.path.basename(directory) != "checkpoints" and os.path.isdir(
      os.path.join(directory, "checkpoints")):
    directory = os.path.join(directory, "checkpoints")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"no checkpoint directory at {directory}; {hint}")
  name_format = ocp.path.step.standard_name_format()  # what Checkpointer writes
  if step is None:
    found = ocp.path.step.latest_step_metadata(directory, name_format)
  else:
    try:
      found = name_format.find_step(directory, step)
    except ValueError:
      found = None
  if found is None:
    which = "no complete checkpoint" if step is None else f"no checkpoint of step {step}"
    raise FileNotFoundError(f"{directory} holds {which}; {hint}")
  handler = ocp.StandardCheckpointHandler()
  try:
    item = found.path / "state"
    # Onto this process's first device, whatever topology wrote it (a run on
    # several processes or devices is read on one just as well).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree_util.tree_map(
        lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
        handler.metadata(item).tree)
    state = handler.restore(item, args=ocp.args.StandardRestore(target))
  finally:
    handler.close()
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
