"""Orbax checkpoints of the train state and the data iterator.

Saves are asynchronous; a step directory only becomes visible once complete
(Orbax writes to a temporary name and renames), so a run killed mid-save
leaves the previous checkpoints intact (and a temporary directory that the
next start removes). Restore takes the newest checkpoint that loads; newer
damaged ones are moved aside (never deleted) with a warning; when none loads
it raises CheckpointRestoreError and touches nothing.

Topology: the train state is restored onto the current mesh and shardings
(replicated or FSDP, any number of devices and processes); the data position
is one number of global batches, written by every process
(`data/process_<i>-of-<n>.json`), so a run saved by N processes resumes on M
with the same data order. Checkpoints of the per-process data layout of older
versions (no `data_order` in their metadata) written by several processes are
refused with DataOrderError: their order cannot be continued.

A save that fails (disk full, read-only folder) raises WriteError naming the
step and the directory; the previous checkpoints stay as they were.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from typing import Any, Optional

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp

from adaptive_vision import atomic
from adaptive_vision.atomic import WriteError, reason

log = logging.getLogger(__name__)


class DataOrderError(ValueError):
  """A checkpoint's data position cannot be continued in the same order here."""


DATA_LAYOUT = "global-batches"  # make_train_dataset: the global batches do not depend on processes


# Orbax gives up on an async save after this many seconds of wall time, and the
# run then stops with an error. Its default (20 minutes) killed a healthy run
# whose process had been paused (SIGSTOP) for 25 minutes during a save: the
# pause counts as waiting. A save that truly hangs then surfaces later.
SAVE_TIMEOUT_S = 6 * 3600


class SaveTimeoutError(WriteError):
  """An async save did not finish within SAVE_TIMEOUT_S of wall time."""


class Checkpointer:

  def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
               global_batch_size: Optional[int] = None, allow_order_change: bool = False):
    self.directory = os.path.abspath(directory)
    self.global_batch_size = global_batch_size
    self.allow_order_change = allow_order_change
    self._options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=True,
        # A run killed mid-save leaves `<step>.orbax-checkpoint-tmp-*`; drop those.
        cleanup_tmp_directories=True,
        # The step's temporary directory is made in save() itself: made in a
        # background thread, a read-only folder there left save() waiting forever
        # for a signal that thread never sent (orbax 0.12.8); here it raises.
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False,
                                       timeout_secs=SAVE_TIMEOUT_S))
    try:
      self.manager = ocp.CheckpointManager(self.directory, options=self._options)
    except OSError as e:
      raise WriteError(f"could not create {self.directory}: {reason(e)}") from e
    self._writing = None  # step of the save that may still be in flight

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def save(self, step: int, state, data_iterator=None, *, force: bool = False) -> bool:
    self.wait()  # a failed earlier save is reported as that step's
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    order = {"layout": DATA_LAYOUT, "global_batch_size": self.global_batch_size,
             "processes": jax.process_count()}
    try:
      saved = self.manager.save(int(step), args=ocp.args.Composite(**items), force=force,
                                custom_metadata={"data_order": order})
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(step, e) from e
    self._writing = int(step) if saved else None
    return saved

  def wait(self):
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._write_error(self._writing, e) from e
    finally:
      self._writing = None

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()

  def _write_error(self, step, error: BaseException) -> WriteError:
    """One line: which step, where, why; what is left intact is the caller's to add.

    A save can fail after its step was committed (removing checkpoints beyond
    max_to_keep, say); the directory is read again so all_steps() says what is
    on disk, and the message says the step is complete.
    """
    try:
      self.manager.reload()
      committed = step is not None and step in self.manager.all_steps()
    except Exception:  # pylint: disable=broad-except
      committed = False
    if isinstance(error, TimeoutError) and not committed:
      return SaveTimeoutError(
          f"the checkpoint of step {step} to {self.directory} did not finish within "
          f"Orbax's limit of {SAVE_TIMEOUT_S} s (time the process spent paused or "
          f"suspended counts): {reason(error)}")
    if committed:
      return WriteError(f"the checkpoint of step {step} in {self.directory} is complete, but "
                        f"saving failed after it was committed: {reason(error)}")
    return WriteError(f"could not write the checkpoint of step {step} to {self.directory}: "
                      f"{reason(error)}")

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
      position = None
      try:
        if data_iterator is not None:
          # Before the arrays: a refused data order must not read as damage.
          position = self._data_position(step)
        with _without_orbax_item_notices():
          restored = self.manager.restore(
              step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        error = None
      except DataOrderError:
        raise
      except Exception as e:  # pylint: disable=broad-except
        restored, error = None, e
      if not on_all_processes(error is None):
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
      if data_iterator is not None:
        data_iterator.set_state(position)
        getattr(data_iterator, "start_prefetch", lambda: None)()  # as grain's restore does
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


  def _data_position(self, step: int) -> dict:
    """The data iterator's state saved with `step`, for this topology.

    Every process wrote the same global position; the files of any process
    count are read. Missing or differing files are damage (ValueError).
    """
    found = ocp.path.step.standard_name_format().find_step(self.directory, step)
    folder = found.path / "data"
    names = sorted(p.name for p in folder.glob("process_*-of-*.json")) if folder.exists() else []
    parsed = [re.fullmatch(r"process_(\d+)-of-(\d+)\.json", n) for n in names]
    counts = {int(m.group(2)) for m in parsed if m}
    if len(counts) != 1 or sorted(int(m.group(1)) for m in parsed) != list(range(max(counts))):
      raise ValueError(f"data-iterator files of step {step} are incomplete: {names} in {folder}")
    states = [json.loads((folder / n).read_text()) for n in names]
    if any(s != states[0] for s in states):
      raise ValueError(f"the processes saved different data positions at step {step}: {states}")
    saved_by = counts.pop()
    order = self._data_order(step)
    refusal = data_order_refusal(order, saved_by, step, self.global_batch_size)
    if refusal and not self.allow_order_change:
      raise DataOrderError(refusal)
    if refusal:
      log.warning("%s; continuing anyway (allow_config_change=True)", refusal)
    return states[0]

  def _data_order(self, step: int) -> Optional[dict]:
    try:
      with _without_orbax_item_notices():
        custom = self.manager.metadata(step).custom_metadata or {}
    except Exception:  # pylint: disable=broad-except
      return None
    return custom.get("data_order")


class _DropItemNotices(logging.Filter):
  """Drops Orbax's 'Item "state" was found in the checkpoint, but could not be
  restored' lines: the manager logs them when it reads a step's metadata
  without item handlers, which is all we ask of it; the state is restored (or
  fails loudly) by the explicit restore arguments."""

  def filter(self, record: logging.LogRecord) -> bool:
    return "was found in the checkpoint, but could not be restored" not in record.getMessage()


@contextlib.contextmanager
def _without_orbax_item_notices():
  logger, notice = logging.getLogger("absl"), _DropItemNotices()
  logger.addFilter(notice)
  try:
    yield
  finally:
    logger.removeFilter(notice)


def data_order_refusal(order: Optional[dict], saved_by: int, step: int,
                       global_batch_size: Optional[int]) -> Optional[str]:
  """Why the data position saved with `step` cannot continue the same data
  order here (one line, with what to do), or None when it can.

  `order` is the checkpoint's `data_order` metadata (None: written before it
  existed, when each of `saved_by` processes shuffled its own slice of the data).
  """
  if order is None:
    if saved_by == 1:
      return None  # one process: the same order as global batches
    return (f"the checkpoint at step {step} was written by {saved_by} processes that each "
            "read their own shuffled slice of the data (the layout of older versions); "
            "this version reads one global order, so resuming would change the data order: "
            "finish the run with the version that started it, or set "
            "--config.allow_config_change=True to continue in the new order")
  if order.get("layout") != DATA_LAYOUT:
    return (f"the checkpoint at step {step} has data layout {order.get('layout')!r}, which "
            f"this version does not read ({DATA_LAYOUT!r}); finish the run with the version "
            "that started it, or set --config.allow_config_change=True")
  saved = order.get("global_batch_size")
  if global_batch_size is not None and saved is not None and saved != global_batch_size:
    return (f"the checkpoint at step {step} was trained with global batch {saved}, this "
            f"run uses {global_batch_size}: the data position counts batches of {saved}; "
            f"set batch_size={saved} (the per-process batch follows from it), or set "
            "--config.allow_config_change=True to continue in another order")
  return None


class CheckpointRestoreError(ValueError):
  """Checkpoints exist but none of them restores."""


def on_all_processes(ok: bool) -> bool:
  """`ok` on every process (the same answer on all of them)."""
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
    atomic.write_json(path, signature, indent=1, sort_keys=True)
