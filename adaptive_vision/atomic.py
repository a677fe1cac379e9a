"""Result files that are either the previous version or the new one, never cut short.

Each helper writes to a hidden temporary file in the target's folder, flushes it
to disk (fsync), then renames it over the target (os.replace is atomic within a
filesystem) and syncs the folder. A process killed mid-write leaves the previous
file and a temporary `.<name>.tmp-<host>-<pid>-<hex>` that no result pattern
matches (`*.npz`, `*.json`, ...); the next write of the same file removes the
leftovers of dead processes. A failed write (disk full, read-only folder) raises
WriteError naming the path and leaves the previous file as it was.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import uuid
from typing import IO, Any, Iterator


class WriteError(OSError):
  """A file could not be written (no space left, read-only folder...)."""


def reason(error: BaseException) -> str:
  """The OS's words for why a write failed, also from tensorstore's messages."""
  if isinstance(error, OSError) and error.strerror:
    return error.strerror
  code = re.search(r"os_error_code='?(\d+)", str(error))
  if code:
    return os.strerror(int(code.group(1)))
  return " ".join(str(error).split())[:300] or type(error).__name__


def _host() -> str:
  return re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"


def _remove_leftovers(folder: str, name: str) -> None:
  """Temporaries of `name` left by dead processes of this host."""
  prefix = f".{name}.tmp-{_host()}-"
  for tmp in glob.glob(os.path.join(glob.escape(folder), glob.escape(prefix) + "*")):
    pid = os.path.basename(tmp)[len(prefix):].split("-")[0]
    if not pid.isdigit() or int(pid) == os.getpid():
      continue
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      with contextlib.suppress(OSError):
        os.remove(tmp)
    except OSError:  # alive, another user's
      pass


def _fsync_folder(folder: str) -> None:
  try:
    fd = os.open(folder, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:  # some filesystems cannot sync a directory; the rename stands
    pass
  finally:
    os.close(fd)


@contextlib.contextmanager
def replace(path: str | os.PathLike, mode: str = "w") -> Iterator[IO[Any]]:
  """`with replace(path) as f: f.write(...)`: `path` changes only when the block
  ends without an exception, and then all at once."""
  path = os.fspath(path)
  folder, name = os.path.dirname(path) or ".", os.path.basename(path)
  try:  # results go to new folders (results/<study>/...): make them
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    error = WriteError(f"could not write {path}: {reason(e)}")
    error.errno = e.errno
    raise error from e
  tmp = os.path.join(folder, f".{name}.tmp-{_host()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, mode) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    if isinstance(e, OSError) and not isinstance(e, WriteError):
      error = WriteError(f"could not write {path}: {reason(e)}")
      error.errno = e.errno
      raise error from e
    raise
  _fsync_folder(folder)
  _remove_leftovers(folder, name)


def write_bytes(path, data: bytes) -> str:
  with replace(path, "wb") as f:
    f.write(data)
  return os.fspath(path)


def write_text(path, text: str) -> str:
  with replace(path, "w") as f:
    f.write(text)
  return os.fspath(path)


def write_json(path, obj: Any, **dump_kwargs) -> str:
  """json.dump(obj, f, **dump_kwargs) into `path`; a value json cannot encode
  raises before anything is replaced."""
  with replace(path, "w") as f:
    json.dump(obj, f, **dump_kwargs)
  return os.fspath(path)


def save_npz(path, **arrays) -> str:
  """np.savez to exactly `path` (no '.npz' appended)."""
  import numpy as np
  with replace(path, "wb") as f:
    np.savez(f, **arrays)
  return os.fspath(path)


def save_figure(path, fig, **savefig_kwargs) -> str:
  """fig.savefig into `path`, in the format its extension names."""
  savefig_kwargs.setdefault("format", os.path.splitext(os.fspath(path))[1].lstrip(".") or "png")
  with replace(path, "wb") as f:
    fig.savefig(f, **savefig_kwargs)
  return os.fspath(path)


def copy_file(src, dst) -> str:
  with open(src, "rb") as fin, replace(dst, "wb") as fout:
    shutil.copyfileobj(fin, fout)
  return os.fspath(dst)
