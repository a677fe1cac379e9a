"""Atomic file writes: a kill at any moment leaves the previous file or the new
one, never a truncated file that loads.

Each write goes to a temporary file in the same folder (same filesystem, so
the final os.replace is atomic), is flushed and fsynced, then renamed over the
target; on any error the temporary file is removed and the target untouched.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, Callable, Iterator


@contextlib.contextmanager
def open_for_write(path: str | os.PathLike, mode: str = "wb") -> Iterator[Any]:
  """A file object whose content replaces `path` only when the block ends
  without an exception."""
  path = os.fspath(path)
  folder = os.path.dirname(path) or "."
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(tmp)
    raise


def write_bytes(path: str | os.PathLike, data: bytes) -> str:
  with open_for_write(path, "wb") as f:
    f.write(data)
  return os.fspath(path)


def write_text(path: str | os.PathLike, text: str) -> str:
  with open_for_write(path, "w") as f:
    f.write(text)
  return os.fspath(path)


def write_json(path: str | os.PathLike, obj: Any, **kwargs) -> str:
  with open_for_write(path, "w") as f:
    json.dump(obj, f, **kwargs)
  return os.fspath(path)


def write_with(path: str | os.PathLike, write: Callable[[Any], None]) -> str:
  """`write(f)` fills a binary file object (np.savez, fig.savefig(f, format=...))."""
  with open_for_write(path, "wb") as f:
    write(f)
  return os.fspath(path)


def copy(src: str | os.PathLike, dst: str | os.PathLike) -> str:
  with open(src, "rb") as s, open_for_write(dst, "wb") as d:
    shutil.copyfileobj(s, d)
  return os.fspath(dst)
