"""Metric writers: JSON lines, TensorBoard (process 0) and a progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np

from adaptive_vision.atomic import WriteError, reason


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class _TensorBoard:
  """Scalars into a TensorBoard event file, written in the calling thread.

  tensorboardX's SummaryWriter writes from a thread of its own; on a full disk
  that thread dies and add_scalar then blocks forever on its full queue (a run
  that hangs instead of stopping). Here a failed write raises OSError.
  """

  def __init__(self, logdir: str):
    from tensorboardX.event_file_writer import EventsWriter
    from tensorboardX.proto.event_pb2 import Event
    from tensorboardX.summary import scalar
    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    self._event, self._scalar = Event, scalar
    # The pid keeps two starts within one second from sharing a file name.
    self._writer = EventsWriter(os.path.join(logdir, "events"), f".{os.getpid()}")

  def write(self, step: int, scalars: dict) -> None:
    for tag, value in scalars.items():
      self._writer.write_event(self._event(wall_time=time.time(), step=int(step),
                                           summary=self._scalar(tag, value)))
    self._writer.flush()

  def close(self) -> None:
    self._writer.close()


class MetricWriter:
  """Appends one JSON object per line to `<workdir>/metrics.jsonl`.

  Only process 0 writes. Lines carry `step` and a `kind` ('train'/'eval'/...).
  TensorBoard summaries go to `<workdir>/tensorboard` when tensorboardX exists.
  A line that cannot be written (disk full, read-only folder) raises WriteError
  naming the file and the step.
  """

  def __init__(self, workdir: str, *, is_primary: bool = True, tensorboard: bool = True):
    self.is_primary = is_primary
    self.path = os.path.join(workdir, "metrics.jsonl")
    self._file = None
    self._tb = None
    if not is_primary:
      return
    try:
      self._file = open(self.path, "a", buffering=1)
    except OSError as e:
      raise WriteError(f"could not open {self.path} for writing: {reason(e)}") from e
    if tensorboard:
      try:
        self._tb = _TensorBoard(os.path.join(workdir, "tensorboard"))
      except ImportError:  # optional: JSON lines are the source of truth
        self._tb = None
      except OSError as e:
        raise WriteError(f"could not open {workdir}/tensorboard for writing: {reason(e)}") from e

  def write(self, step: int, kind: str, metrics: dict) -> dict:
    record = {"step": int(step), "kind": kind}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    if self.is_primary:
      try:
        self._file.write(json.dumps(record) + "\n")  # line-buffered: flushed here
      except OSError as e:
        raise WriteError(f"could not write step {step} to {self.path}: {reason(e)}") from e
      if self._tb is not None:
        scalars = {f"{kind}/{k}": v for k, v in record.items()
                   if k not in ("step", "kind") and isinstance(v, (int, float))}
        try:
          self._tb.write(step, scalars)
        except OSError as e:
          raise WriteError(f"could not write step {step} to {self._tb.logdir}: {reason(e)}") from e
    return record

  def close(self):
    errors = []
    for closer in (self._file, self._tb):  # both, even when the first fails
      try:
        if closer is not None:
          closer.close()
      except OSError as e:
        errors.append(e)
    if errors:
      raise WriteError(f"could not finish writing {self.path}: {reason(errors[0])}") from errors[0]


def read_metrics(workdir: str, kind: Optional[str] = None) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return [r for r in rows if kind is None or r.get("kind") == kind]


class Progress:
  """One line per log step: step, loss, images/s and ETA (stderr, process 0)."""

  def __init__(self, total_steps: int, batch_size: int, start_step: int, enabled: bool = True):
    self.total, self.batch, self.enabled = total_steps, batch_size, enabled
    self._t0, self._s0 = time.perf_counter(), start_step

  def reset(self, step: int):
    self._t0, self._s0 = time.perf_counter(), step

  def rate(self, step: int) -> float:
    dt = time.perf_counter() - self._t0
    return (step - self._s0) * self.batch / dt if dt > 0 else 0.0

  def line(self, step: int, loss: float, extra: str = "") -> str:
    ips = self.rate(step)
    remaining = (self.total - step) * self.batch / ips if ips > 0 else math.nan
    eta = time.strftime("%H:%M:%S", time.gmtime(remaining)) if math.isfinite(remaining) else "?"
    text = (f"step {step}/{self.total}  loss {loss:.4f}  {ips:.1f} img/s  "
            f"ETA {eta}{('  ' + extra) if extra else ''}")
    if self.enabled:
      print(text, file=sys.stderr, flush=True)
    return text
