"""The logits file contract: `<split>_logits.npz` with `exit_logits` float32
[E, N, K], `labels` int [N] and `exit_macs` float [E] (cumulative MACs per
image). What evaluation writes and every report reads."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np

from adaptive_vision import atomic


@dataclasses.dataclass(frozen=True)
class ExitLogits:
  """Validated per-exit logits of one split.

  Attributes:
    exit_logits: float32 [E, N, K] (a [N, K] input is taken as one exit).
    labels: int64 [N].
    exit_macs: float64 [E], cumulative MACs per image, non-decreasing.
  """
  exit_logits: np.ndarray
  labels: np.ndarray
  exit_macs: np.ndarray

  def __post_init__(self):
    logits = np.asarray(self.exit_logits, dtype=np.float32)
    if logits.ndim == 2:
      logits = logits[None]
    if logits.ndim != 3:
      raise ValueError(f"exit_logits must be [E, N, K], got shape {logits.shape}")
    num_exits, n, _ = logits.shape
    labels = np.asarray(self.labels)
    if labels.shape != (n,):
      raise ValueError(f"labels has shape {labels.shape} but exit_logits {logits.shape} "
                       f"holds N={n} examples")
    if n and not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    macs = np.asarray(self.exit_macs, dtype=np.float64).reshape(-1)
    if macs.shape != (num_exits,):
      raise ValueError(f"exit_macs has {macs.size} entries for {num_exits} exits")
    if np.any(np.diff(macs) < 0):
      raise ValueError(f"exit_macs must be non-decreasing (cumulative), got {macs.tolist()}")
    object.__setattr__(self, "exit_logits", logits)
    object.__setattr__(self, "labels", labels.astype(np.int64))
    object.__setattr__(self, "exit_macs", macs)

  @property
  def num_exits(self) -> int:
    return self.exit_logits.shape[0]

  @property
  def num_examples(self) -> int:
    return self.exit_logits.shape[1]

  @property
  def num_classes(self) -> int:
    return self.exit_logits.shape[2]


_KEYS = ("exit_logits", "labels", "exit_macs")


def save_logits(path: str | os.PathLike, exit_logits: Any, labels: Any,
                exit_macs: Any) -> str:
  """Write the logits npz of the contract (validated); returns the path."""
  if isinstance(exit_logits, (list, tuple)):
    exit_logits = np.stack([np.asarray(x) for x in exit_logits])
  data = ExitLogits(exit_logits, labels, exit_macs)
  return atomic.save_npz(path, exit_logits=data.exit_logits, labels=data.labels,
                         exit_macs=data.exit_macs)


def load_logits(path: str | os.PathLike) -> ExitLogits:
  """Read and validate a logits npz."""
  with np.load(os.fspath(path)) as z:
    missing = [k for k in _KEYS if k not in z.files]
    if missing:
      raise ValueError(f"{os.fspath(path)} lacks {missing}; a logits file holds "
                       f"{list(_KEYS)} (found {z.files})")
    try:
      return ExitLogits(z["exit_logits"], z["labels"], z["exit_macs"])
    except ValueError as e:
      raise ValueError(f"{os.fspath(path)}: {e}") from None


def as_logits(x: Any) -> ExitLogits:
  """`x` itself, or the logits file it names."""
  if isinstance(x, ExitLogits):
    return x
  if isinstance(x, (str, os.PathLike)):
    return load_logits(x)
  raise TypeError(f"expected ExitLogits or a path to a logits npz, got {type(x)}")
