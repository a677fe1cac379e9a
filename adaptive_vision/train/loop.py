"""train_and_evaluate: the training loop (the edge where files, devices and
signals live; everything it calls is pure)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time

import jax
import numpy as np

from adaptive_vision import atomic, data as data_lib
from adaptive_vision import losses, machine, models, workdir_lock
from adaptive_vision.eval import logits as logits_lib
from adaptive_vision.eval import predict
from adaptive_vision.config import require
from adaptive_vision.train import build as build_lib
from adaptive_vision.train import checkpointing
from adaptive_vision.train.metrics import MetricWriter, Progress
from adaptive_vision.train.state import param_count

log = logging.getLogger(__name__)


class NonFiniteError(RuntimeError):
  """Loss, gradient norm or parameter norm became NaN/inf."""


class Preempted(SystemExit):
  """SIGTERM arrived; a checkpoint of the current step was written.
  launch.train exits with EXIT_CODE (EX_TEMPFAIL of sysexits.h)."""
  EXIT_CODE = 75


def check_workdir(workdir: str) -> None:
  """A workdir that is a directory or can be made one (missing parents are
  created with it, later); a file in the way or a folder this user cannot
  write is a one-line error. Creates nothing."""
  path = os.path.abspath(workdir)
  while not os.path.exists(path):  # the nearest existing folder is where mkdir starts
    path = os.path.dirname(path)
  if not os.path.isdir(path):
    where = "--workdir" if path == os.path.abspath(workdir) else "a parent of --workdir"
    raise ValueError(f"{where} is a file, not a directory: {path}; choose another workdir")
  if not os.access(path, os.W_OK | os.X_OK):
    what = "--workdir" if path == os.path.abspath(workdir) else "the folder to create --workdir in"
    raise ValueError(f"{what} is not writable: {path}; choose another workdir")


def validate_config(config, workdir: str) -> None:
  """Cheap checks that run before any data is read or anything compiles."""
  check_workdir(workdir)
  workdir_lock.settings(config)  # the workdir lock's lease and heartbeat
  if config.batch_size % jax.process_count():
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the "
                     f"{jax.process_count()} processes")
  mesh_cfg = require(config, "mesh")
  data_axis = int(require(mesh_cfg, "data", "mesh"))
  if data_axis == -1:
    data_axis = jax.device_count() // int(require(mesh_cfg, "model", "mesh"))
  if data_axis > 0 and config.batch_size % data_axis:
    raise ValueError(f"batch_size {config.batch_size} is not divisible by the {data_axis} "
                     "devices of the mesh's data axis; use a multiple of "
                     f"{data_axis} (or set mesh.data)")
  models.build(config.model)  # unknown keys, bad variants, image/patch mismatch
  models.exit_macs(config.model)
  build_lib.data_views(config)  # the inputs the model(s) read fit the data
  if config.model.num_classes != config.data.num_classes:
    raise ValueError(f"model.num_classes={config.model.num_classes} but "
                     f"data.num_classes={config.data.num_classes}")
  if config.loss.name not in losses.LOSS_NAMES:
    raise ValueError(f"unknown loss.name={config.loss.name!r}; valid names: {losses.LOSS_NAMES}")
  if config.loss.name in ("kd", "erde") and not require(config, "teacher"):
    raise ValueError(f"loss.name={config.loss.name!r} needs a teacher: set "
                     "teacher.model and teacher.checkpoint")


# Keys that may change between invocations of one run without changing what it
# computes (logging, checkpoint cadence, placement, where files live).
_OPERATIONAL = ("log_every", "eval_every", "checkpoint_every", "stop_at_step", "max_to_keep",
                "async_checkpoints", "eval_batch_size", "eval_splits", "mesh", "param_sharding",
                "allow_config_change", "data.num_workers", "data.prefetch_buffer_size",
                "data.cache_dir", "data.path",
                "teacher.checkpoint", "backend", "workdir_lock")


def _flatten(d, prefix=""):
  out = {}
  for k, v in (d or {}).items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(_flatten(v, key + "."))
    else:
      out[key] = v
  return out


def check_same_recipe(config, workdir: str) -> None:
  """Refuses to resume a run whose recipe changed (epochs, optimizer, data, loss...).

  Resuming under another recipe would silently mix two schedules; the config
  field `allow_config_change=True` accepts it deliberately.
  """
  path = os.path.join(workdir, "config.json")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  if require(config, "allow_config_change") or not os.path.exists(path):
    return
  if not os.path.isdir(ckpt_dir) or not any(d.isdigit() for d in os.listdir(ckpt_dir)):
    return  # nothing to resume: a fresh start may use any recipe
  with open(path) as f:
    old = _flatten(json.load(f))
  new = _flatten(json.loads(config.to_json_best_effort()))
  operational = lambda k: any(k == o or k.startswith(o + ".") for o in _OPERATIONAL)
  changed = sorted(k for k in set(old) | set(new)
                   if not operational(k) and old.get(k) != new.get(k))
  if changed:
    shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in changed[:4])
    raise ValueError(f"workdir {workdir} holds a run trained with another recipe ({shown}); "
                     "use a new --workdir, or set --config.allow_config_change=True to resume anyway")


@contextlib.contextmanager
def hold_workdir(config, workdir: str):
  """The job's one lock on `workdir` (adaptive_vision/workdir_lock.py), held by
  process 0 for all processes. If it cannot be taken, every process raises
  workdir_lock.Held (process 0's names the holder) before writing anything."""
  settings = workdir_lock.settings(config)
  with contextlib.ExitStack() as stack:
    refused = None
    if jax.process_index() == 0:
      try:
        stack.enter_context(workdir_lock.hold(workdir, **settings))
      except Exception as e:  # pylint: disable=broad-except  # Held, or no lock could be written
        refused = e
    if not checkpointing.on_all_processes(refused is None):
      if refused is not None:
        raise refused
      raise workdir_lock.Held(f"process 0 could not take the lock of workdir {workdir} "
                              "(its error names the holder); nothing was written")
    yield


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its newest checkpoint.

  Returns the final evaluation metrics. Raises NonFiniteError on NaN/inf,
  Preempted (after saving) on SIGTERM, and workdir_lock.Held, having written
  nothing, when another live process writes in `workdir`.
  """
  validate_config(config, workdir)
  # Reads (or finds missing) the dataset before anything is written to workdir.
  info = data_lib.dataset_info(config.data)
  try:  # with any missing parents, like runs/ in a fresh clone
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cannot create --workdir {workdir}: {e.strerror or e}") from e
  with hold_workdir(config, workdir):  # before anything is written in it
    return _train_and_evaluate(config, workdir, info)


def _train_and_evaluate(config, workdir: str, info: dict) -> dict:
  primary = jax.process_index() == 0
  steps_per_epoch = max(info["train_size"] // config.batch_size, 1)
  trainer = build_lib.build(config, train_size=info["train_size"])
  total_steps = trainer.total_steps
  checkpointing.check_signature(workdir, trainer.signature(), write=True)

  check_same_recipe(config, workdir)
  train_iter = trainer.train_iterator()
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    max_to_keep=require(config, "max_to_keep"),
                                    async_save=require(config, "async_checkpoints"),
                                    global_batch_size=config.batch_size,
                                    allow_order_change=require(config, "allow_config_change"))
  restored = ckpt.restore(trainer.restore_target(), train_iter)
  if restored is None:
    state = trainer.init_state()
    start = 0
  else:
    start, state = restored
    log.info("resumed from step %d", start)
    if primary:
      print(f"resuming from checkpoint at step {start}", file=sys.stderr, flush=True)
  if primary:  # only now: a refused workdir keeps the config.json of its run
    atomic.write_text(os.path.join(workdir, "config.json"),
                      config.to_json_best_effort(indent=2, sort_keys=True))
  train_step, teacher_vars = trainer.train_step, trainer.teacher_variables

  if primary:
    _drop_metrics_after(workdir, start, redo_final=start >= total_steps)
  writer = MetricWriter(workdir, is_primary=primary)
  if primary and start == 0:
    writer.write(0, "info", {"params": param_count(trainer.abstract_state.params),
                             "exit_macs": models.exit_macs(config.model),
                             "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                             "devices": jax.device_count(), "processes": jax.process_count()})
  if primary:  # every process start: a resumed run says which machine trained which steps
    writer.write(start, "machine", {"machine": machine.describe(),
                                    "device_kind": jax.devices()[0].device_kind,
                                    "devices": jax.device_count()})
  progress = Progress(total_steps, config.batch_size, start, enabled=primary)
  log_every = int(require(config, "log_every"))
  ckpt_every = int(require(config, "checkpoint_every"))
  eval_every = int(require(config, "eval_every"))
  # End this invocation after this step (checkpoint saved); the same command
  # continues later. For time-sliced clusters and for resume tests.
  stop_at = int(require(config, "stop_at_step"))

  preempted = []
  previous_handler = None
  # Several processes must save the same step together: jax's preemption
  # service (on with jax.distributed) catches SIGTERM on any of them and names
  # a step that all reach. One process: a plain SIGTERM handler.
  synced_preemption = jax.process_count() > 1 and _preemption_service_running()
  if not synced_preemption and hasattr(signal, "SIGTERM") and threading_is_main():
    previous_handler = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))

  def check(metrics, step):
    m = jax.device_get(metrics)
    if not bool(m["finite"]):
      bad = [k for k in ("loss", "grad_norm", "param_norm") if not np.isfinite(m[k])]
      last = ckpt.all_steps()
      raise NonFiniteError(
          f"step {step}: {', '.join(bad)} became non-finite ({', '.join(f'{k}={m[k]}' for k in bad)}); "
          f"stopping. The last good checkpoint (step {last[-1] if last else 'none'}) is kept; "
          "lower optim.lr or enable optim.grad_clip")
    return m

  def run_eval(step):
    out = {}
    for split in require(config, "eval_splits"):
      logits, labels = predict.evaluate_split(config, trainer.eval_step, state.params,
                                              state.batch_stats, split, trainer.mesh,
                                              trainer.views)
      accs = predict.exit_accuracies(logits, labels)
      rec = {f"accuracy/exit{i}": a for i, a in enumerate(accs)}
      rec.update(split=split, accuracy=accs[-1], num_examples=len(labels))
      writer.write(step, "eval", rec)
      out[split] = (logits, labels, rec)
      if primary:
        print(f"eval {split} step {step}: " + "  ".join(
            f"exit{i} {100 * a:.2f}%" for i, a in enumerate(accs)), file=sys.stderr, flush=True)
    return out

  train_start = time.perf_counter()
  pending = None  # metrics of the previous step, checked one step late to keep dispatch async
  step = start
  failed = False
  try:
    while step < total_steps:
      batch = trainer.prepare_batch(next(train_iter), step)
      state, metrics = train_step(state, batch, teacher_vars)
      if pending is not None:
        check(pending, step)
      step += 1
      pending = metrics
      if synced_preemption:
        from jax.experimental import multihost_utils
        if multihost_utils.reached_preemption_sync_point(step):
          preempted.append(True)
      stopping = bool(preempted)  # read once: the signal may arrive any time
      if step == start + 1:
        progress.reset(step)  # exclude compilation from images/s
      boundary = step % log_every == 0 or step == total_steps
      if boundary or step % ckpt_every == 0 or stopping:
        m = check(metrics, step)
        pending = None
        if boundary:
          rec = {k: v for k, v in m.items() if k != "finite"}
          rec["images_per_sec"] = progress.rate(step)
          writer.write(step, "train", rec)
          progress.line(step, float(m["loss"]), f"lr {float(m['lr']):.2e}")
      if step % ckpt_every == 0 or stopping:
        ckpt.save(step, state, train_iter, force=stopping)
      if stopping:
        ckpt.wait()
        raise Preempted(f"SIGTERM received: saved a checkpoint at step {step} in "
                        f"{workdir}; run the same command again to resume")
      if eval_every and step % eval_every == 0 and step < total_steps:
        run_eval(step)
      if stop_at and step >= stop_at and step < total_steps:
        if pending is not None:
          check(pending, step)
          pending = None
        if step not in ckpt.all_steps():  # not already saved by checkpoint_every
          ckpt.save(step, state, train_iter, force=True)
        ckpt.wait()
        return {"step": step, "stopped_early": True,
                "train_seconds": time.perf_counter() - train_start}
    if pending is not None:
      check(pending, step)
    if step not in ckpt.all_steps():
      ckpt.save(step, state, train_iter, force=True)
    ckpt.wait()
    results = run_eval(step)
    summary = {"step": step, "train_seconds": time.perf_counter() - train_start,
               "exit_macs": models.exit_macs(config.model)}
    for split, (logits, labels, rec) in results.items():
      summary[split] = rec
      if primary:
        logits_lib.save_logits(os.path.join(workdir, f"{split}_logits.npz"), logits, labels,
                              np.asarray(summary["exit_macs"]))
    # start_step > 0: a resumed run; train_seconds is then this process's share.
    writer.write(step, "final", {"train_seconds": summary["train_seconds"], "start_step": start})
    return summary
  except BaseException as e:
    failed = True
    if isinstance(e, atomic.WriteError):  # disk full, read-only: what stands, how to go on
      raise type(e)(f"{e}; {_intact(ckpt, e)}") from e
    raise
  finally:
    if previous_handler is not None:
      signal.signal(signal.SIGTERM, previous_handler)
    for close in (ckpt.close, writer.close):
      try:
        close()
      except Exception as e:  # pylint: disable=broad-except
        if not failed:  # else the first error is the one to report
          raise
        log.warning("while stopping, %s failed too: %s", close.__qualname__, atomic.reason(e))


def _intact(ckpt, error: BaseException) -> str:
  """What a stopped run keeps and how to go on, after a write failed."""
  try:
    ckpt.wait()
  except atomic.WriteError:
    pass  # the newest save failed too: the older ones are what stands
  steps = ckpt.all_steps()
  kept = (f"the checkpoint of step {steps[-1]} is intact" if steps
          else "no checkpoint was written yet")
  if isinstance(error, checkpointing.SaveTimeoutError):
    return f"{kept}; run the same command again to resume"
  return (f"{kept}; free space (or make the folder writable) and run the same command "
          "again to resume")


def _drop_metrics_after(workdir: str, step: int, *, redo_final: bool = False) -> int:
  """Makes metrics.jsonl hold exactly what a never-interrupted run would have
  written up to `step`, the step training (re)starts from.

  A run killed or preempted after its last checkpoint logged steps that the
  resumed run computes and logs again; those lines (step > `step`, or every
  line on a fresh start, whose 'info' line is written again) are dropped, as
  is a line cut short by a kill. With `redo_final` (the run had finished and
  is evaluated again) the eval/final lines of `step` go too. The file is
  replaced atomically. Returns the number of lines dropped.
  """
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  keep, dropped, unterminated = [], 0, False
  with open(path) as f:
    for line in f:
      unterminated = not line.endswith("\n")
      try:
        record = json.loads(line)
        s, kind = int(record["step"]), record.get("kind")
      except (ValueError, KeyError, TypeError):
        dropped += 1  # cut short by a kill
        continue
      if step > 0 and (s < step or (s == step and not (redo_final and kind in ("eval", "final")))):
        keep.append(line.rstrip("\n") + "\n")
      else:
        dropped += 1
  if dropped or unterminated:
    atomic.write_text(path, "".join(keep))
    log.info("metrics.jsonl: dropped %d lines written after step %d; they are written again",
             dropped, step)
  return dropped


def _preemption_service_running() -> bool:
  try:
    from jax._src import distributed
    return distributed.global_state.preemption_sync_manager is not None
  except (ImportError, AttributeError):
    return False


def threading_is_main() -> bool:
  import threading
  return threading.current_thread() is threading.main_thread()
