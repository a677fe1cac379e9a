"""Metric writers: JSON lines, TensorBoard (process 0) and a progress line."""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Optional

import numpy as np


def _scalar(v):
  v = np.asarray(v)
  return v.item() if v.size == 1 else v.tolist()


class MetricWriter:
  """Appends one JSON object per line to `<workdir>/metrics.jsonl`.

  Only process 0 writes. Lines carry `step` and a `kind` ('train'/'eval'/...).
  TensorBoard summaries go to `<workdir>/tensorboard` when tensorboardX exists.
  """

  def __init__(self, workdir: str, *, is_primary: bool = True, tensorboard: bool = True):
    self.is_primary = is_primary
    self._file = None
    self._tb = None
    if not is_primary:
      return
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter
        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
      except ImportError:  # optional: JSON lines are the source of truth
        self._tb = None

  def write(self, step: int, kind: str, metrics: dict) -> dict:
    record = {"step": int(step), "kind": kind}
    record.update({k: _scalar(v) for k, v in metrics.items()})
    if self.is_primary:
      self._file.write(json.dumps(record) + "\n")
      if self._tb is not None:
        for k, v in record.items():
          if k not in ("step", "kind") and isinstance(v, (int, float)):
            self._tb.add_scalar(f"{kind}/{k}", v, step)
    return record

  def close(self):
    if self._file:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


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
