"""One writer per workdir: a lock file that a dead holder does not keep.

    with workdir_lock.hold(workdir, lease_seconds=180, heartbeat_seconds=30):
      ...  # the only process writing in `workdir`

`hold` creates `<folder>/.lock` with O_CREAT|O_EXCL (exclusive on local
filesystems, NFS v3 and later, and gcsfuse, whose creates carry a "does not
exist yet" precondition): JSON naming the holder (host, pid, the process's
start time, boot id and pid namespace, the scheduler's job id when there is
one, since when, its lease). While it holds the lock a heartbeat thread
renews the lease by touching the file (its modification time is the
heartbeat; touching needs no free space); on exit, exception or SIGTERM the
file is removed. A second process finds the file and, while the holder
lives, raises `Held` (a ValueError: the launchers print it as one `error:`
line, exit code 2) naming the holder and what to do, having changed nothing.

Whether the holder lives:

* Same machine (same host name, boot id and pid namespace): the holder's pid
  exists, is not a zombie, and started at the recorded time (field 22 of
  /proc/<pid>/stat, so a reused pid is not mistaken for it). A killed holder
  (SIGKILL, OOM) is recognised at once, and so is a lock copied along with
  its folder (`cp -r` of a running job's workdir): it names another folder
  (device and inode) than the one it is in.
* Another machine (a cluster's shared filesystem; also another container of
  one host, whose pids this process cannot see): the lease. The holder
  renews it every `heartbeat_seconds`; a lock whose file was not touched for
  more than the holder's `lease_seconds` (written in the lock) belongs to a
  dead holder (machine lost, process killed). The newcomer reads the file's
  time through an open file descriptor, which NFS revalidates (close-to-open),
  and compares it with its own clock: the hosts' clocks must agree to well
  within the lease (NTP does). A job restarted on another host after a crash
  thus waits at most one lease; the error says how long. The job id is shown
  in the error, not trusted: a requeued job keeps its id while its old
  process may still write.

A dead holder's lock is taken over without a race between newcomers: the
newcomer renames the stale file to a name of its own, checks that what it
moved is the lock it judged dead (if not, another newcomer got there first
and it puts the file back), deletes it, and creates its own with O_EXCL, which
only one process can do. The takeover is printed as one line by the process
that takes the lock (when several start at the same instant, a winner that
started after another had deleted the dead lock never saw it, and says
nothing). One narrow window remains: a newcomer that judged the dead lock
but renames only after another newcomer replaced it moves that live lock
aside for the instant of its check; a third newcomer creating the lock in
that instant holds it too, and the first holder finds the foreign lock at
its next heartbeat and stops (below). A holder whose
lock was taken over (it could not renew it for a whole lease, e.g. a stalled
host) notices at its next heartbeat and ends at once, writing nothing more
(`on_lost`); a lock file removed by hand is created again.

Within one process `hold` is re-entrant: a nested hold of the same folder
shares the outer lock. Multi-process jobs take one lock, in process 0
(adaptive_vision/train/loop.py).

Object stores: workdirs are filesystem paths. On a bucket mounted with
gcsfuse the exclusive create holds, so a live holder always refuses a
newcomer; gcsfuse renames by copy and delete, so two newcomers taking over
the same dead lock in the same instant are not guaranteed to exclude each
other there.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable, Iterator, NamedTuple, Optional

from adaptive_vision.atomic import WriteError, reason
from adaptive_vision.config import require

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"
FORMAT = "adaptive_vision.workdir_lock"
# The scheduler's job id, shown in the error (first one set).
JOB_VARIABLES = ("SLURM_JOB_ID", "PBS_JOBID", "LSB_JOBID", "JOB_ID")
_ATTEMPTS = 20          # create / judge / take over rounds before giving up
_YOUNG_SECONDS = 2.0    # an unreadable lock this young is being written: read again


class Held(ValueError):
  """Another live process holds the lock (a ValueError: launchers print one
  line and exit with code 2). `holder`: the lock's JSON, or None."""

  def __init__(self, message: str, holder: Optional[dict] = None):
    super().__init__(message)
    self.holder = holder


class _Seen(NamedTuple):
  info: Optional[dict]   # the lock's JSON; None when unreadable
  raw: bytes
  ino: int
  mtime: float           # the heartbeat


# ----------------------------------------------------------------------------- this process


def _proc_stat(pid: int) -> list[str]:
  """/proc/<pid>/stat from field 3 (state) on; field 22 (start time) is [19]."""
  with open(f"/proc/{int(pid)}/stat") as f:
    text = f.read()
  return text[text.rindex(")") + 2:].split()


def _first_line(path: str) -> Optional[str]:
  try:
    with open(path) as f:
      return f.readline().strip() or None
  except OSError:
    return None


def _pid_namespace() -> Optional[str]:
  try:
    return os.readlink("/proc/self/ns/pid")
  except OSError:
    return None


def _start_ticks(pid: int) -> Optional[int]:
  try:
    return int(_proc_stat(pid)[19])
  except (OSError, ValueError, IndexError):
    return None


def identity() -> dict:
  """Who this process is, as a lock names its holder."""
  job = next((f"{v}={os.environ[v]}" for v in JOB_VARIABLES if os.environ.get(v)), None)
  return {"host": socket.gethostname(), "pid": os.getpid(),
          "start_ticks": _start_ticks(os.getpid()),
          "boot_id": _first_line("/proc/sys/kernel/random/boot_id"), "pid_ns": _pid_namespace(),
          "job": job}


def _same_machine(holder: dict, me: dict) -> bool:
  """The holder's pid means a process this one can see."""
  return all(holder.get(k) == me[k] for k in ("host", "boot_id", "pid_ns"))


def process_alive(pid: int, start_ticks: Optional[int]) -> bool:
  """Process `pid` of this machine runs and is the one that started at
  `start_ticks` (None: not recorded, any process of that pid)."""
  try:
    fields = _proc_stat(pid)
  except FileNotFoundError:
    return False
  except (OSError, ValueError):  # no /proc (not Linux)
    try:
      os.kill(int(pid), 0)
    except ProcessLookupError:
      return False
    except PermissionError:  # another user's
      return True
    return True
  if fields[0] in ("Z", "X"):  # killed, not yet reaped
    return False
  return start_ticks is None or int(fields[19]) == int(start_ticks)


# ----------------------------------------------------------------------------- the file


def _parse(raw: bytes) -> Optional[dict]:
  try:
    info = json.loads(raw.decode())
  except (UnicodeDecodeError, ValueError):
    return None
  if not isinstance(info, dict) or info.get("format") != FORMAT or "token" not in info:
    return None
  return info


def _read_once(path: str) -> Optional[_Seen]:
  try:
    fd = os.open(path, os.O_RDONLY)
  except FileNotFoundError:
    return None
  try:
    st = os.fstat(fd)  # through an open descriptor: NFS revalidates it (close-to-open)
    chunks = []
    while True:
      chunk = os.read(fd, 1 << 16)
      if not chunk:
        break
      chunks.append(chunk)
  finally:
    os.close(fd)
  raw = b"".join(chunks)
  return _Seen(_parse(raw), raw, st.st_ino, st.st_mtime)


def _read(path: str) -> Optional[_Seen]:
  """The lock at `path`, None if there is none. A lock caught between its
  creation and its first write reads empty: read it again for a moment."""
  deadline = time.monotonic() + _YOUNG_SECONDS
  while True:
    seen = _read_once(path)
    if (seen is None or seen.info is not None or time.monotonic() > deadline
        or time.time() - seen.mtime > _YOUNG_SECONDS):
      return seen
    time.sleep(0.05)


def _same_lock(a: _Seen, b: _Seen) -> bool:
  if a.info is not None:  # the token makes every lock's text unique
    return a.raw == b.raw
  return a.raw == b.raw and a.ino == b.ino


def _fsync_folder(folder: str) -> None:
  with contextlib.suppress(OSError):
    fd = os.open(folder, os.O_RDONLY)
    try:
      os.fsync(fd)
    finally:
      os.close(fd)


def _create(path: str, data: bytes) -> bool:
  """Creates `path` holding `data` if no file is there; False if one is."""
  try:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
  except FileExistsError:
    return False
  except OSError as e:
    raise WriteError(f"could not write the lock {path}: {reason(e)}") from e
  try:
    view = memoryview(data)
    while view:
      view = view[os.write(fd, view):]
    os.fsync(fd)
  except BaseException as e:
    os.close(fd)
    with contextlib.suppress(OSError):
      os.remove(path)
    if isinstance(e, OSError):
      raise WriteError(f"could not write the lock {path}: {reason(e)}") from e
    raise
  os.close(fd)
  _fsync_folder(os.path.dirname(path) or ".")
  return True


def _remove(path: str) -> None:
  with contextlib.suppress(FileNotFoundError):
    os.remove(path)


def _put_back(aside: str, path: str) -> None:
  """A live lock moved aside by mistake goes back, unless another lock was
  created meanwhile (then its holder finds a foreign lock and stops)."""
  try:
    os.link(aside, path)  # fails if `path` exists again
  except FileExistsError:
    pass
  except OSError:  # no hard links on this filesystem
    if not os.path.exists(path):
      with contextlib.suppress(OSError):
        os.rename(aside, path)
  _remove(aside)


def _set_aside(path: str, seen: _Seen) -> bool:
  """Removes the dead lock `seen`, unless the file at `path` is by now another
  lock (a newcomer took it over first): then it stays, and False."""
  aside = f"{path}.stale-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
  try:
    os.rename(path, aside)
  except FileNotFoundError:
    return False
  moved = _read_once(aside)
  if moved is not None and _same_lock(moved, seen):
    _remove(aside)
    return True
  _put_back(aside, path)
  return False


# ----------------------------------------------------------------------------- judging a holder


def _when(t: float) -> str:
  return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t))


def _folder_id(folder: str) -> list[int]:
  st = os.stat(folder)
  return [st.st_dev, st.st_ino]


def _judge(seen: _Seen, me: dict, lease_seconds: float, now: float,
           folder_id: list[int]) -> tuple[bool, str]:
  """(alive, why) for the holder of `seen`, found in the folder `folder_id`."""
  age = max(now - seen.mtime, 0.0)
  if seen.info is None:
    return age <= lease_seconds, f"unreadable for {age:.0f} s (lease {lease_seconds:g} s)"
  if _same_machine(seen.info, me):
    if seen.info.get("folder_id") not in (None, folder_id):
      return False, "a copy: it was made for another folder"
    alive = process_alive(seen.info["pid"], seen.info.get("start_ticks"))
    return alive, ("running" if alive else "the process is gone")
  lease = float(seen.info.get("lease_seconds") or lease_seconds)
  return age <= lease, f"no heartbeat for {age:.0f} s, lease {lease:g} s"


def _holder(info: dict) -> str:
  job = f", job {info['job']}" if info.get("job") else ""
  return f"pid {info.get('pid')} on host {info.get('host')}{job}, since {info.get('since')}"


def _held_message(target: str, path: str, seen: _Seen, me: dict, lease_seconds: float,
                  now: float) -> str:
  age = max(now - seen.mtime, 0.0)
  if seen.info is None:
    return (f"{target} is in use: {path} exists but cannot be read (written {age:.0f} s ago; "
            f"it counts as dead {lease_seconds - age:.0f} s from now); if no other process "
            f"uses {target}, remove {path} and run the same command again")
  h = seen.info
  if _same_machine(h, me):
    return (f"{target} is in use by {_holder(h)}: wait for it to finish, stop it "
            f"(kill {h.get('pid')}), or, if you are sure it is dead, remove {path}; "
            "then run the same command again")
  lease = float(h.get("lease_seconds") or lease_seconds)
  return (f"{target} is in use by {_holder(h)}, last heartbeat {age:.0f} s ago (if it has died, "
          f"its lease of {lease:g} s ends in {max(lease - age, 0):.0f} s): wait for it to finish "
          f"or stop it on {h.get('host')}, or, if you are sure it is dead, remove {path}; "
          "then run the same command again")


# ----------------------------------------------------------------------------- the lock


def _stop_process(lock: "Lock") -> None:
  """The default `on_lost`: another process now owns the folder; end at once,
  without writing anything more (no exception handlers, no checkpoint)."""
  holder = _holder(lock.lost_to) if lock.lost_to else "another process"
  print(f"error: {lock.target} was taken over by {holder}: this process could not renew "
        f"its lock {lock.path} for longer than its lease ({lock.info['lease_seconds']:g} s); "
        "stopping at once so as not to write beside it", file=sys.stderr, flush=True)
  os._exit(2)  # pylint: disable=protected-access


def _say(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


class Lock:
  """A lock this process holds: `path`, `info` (its JSON), `took_over` (the
  line printed when it replaced a dead holder's lock, else None)."""

  def __init__(self, path: str, info: dict, target: str, took_over: Optional[str]):
    self.path, self.info, self.target, self.took_over = path, info, target, took_over
    self.lost_to: Optional[dict] = None
    self._data = (json.dumps(info, indent=1) + "\n").encode()
    self._stop = threading.Event()
    self._thread: Optional[threading.Thread] = None

  def owned(self, seen: Optional[_Seen]) -> bool:
    return seen is not None and seen.info is not None and seen.info["token"] == self.info["token"]

  def renew(self) -> bool:
    """One heartbeat: touches the lock; creates it again if it was removed
    by hand. False (and `lost_to`) if another process's lock is there."""
    for attempt in range(2):
      seen = _read(self.path)
      if seen is None and _create(self.path, self._data):
        return True
      seen = seen or _read(self.path)
      if self.owned(seen):
        os.utime(self.path)
        return True
      if attempt == 0:  # a newcomer putting back a lock it moved by mistake: look again
        time.sleep(1.0)
    self.lost_to = seen.info if seen is not None else None
    return False

  def start_heartbeat(self, on_lost: Callable[["Lock"], Any]) -> None:
    def beat():
      while not self._stop.wait(float(self.info["heartbeat_seconds"])):
        try:
          if not self.renew():
            on_lost(self)
            return
        except OSError as e:  # the lease runs on; try again at the next beat
          log.warning("could not renew the lock %s: %s", self.path, reason(e))
    self._thread = threading.Thread(target=beat, name="workdir-lock-heartbeat", daemon=True)
    self._thread.start()

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still this one's."""
    self._stop.set()
    if self._thread is not None and self._thread is not threading.current_thread():
      self._thread.join(timeout=10)
    try:
      if self.owned(_read_once(self.path)):
        _remove(self.path)
    except OSError as e:
      log.warning("could not remove the lock %s: %s", self.path, reason(e))


def check_times(lease_seconds: float, heartbeat_seconds: float) -> None:
  if not 0 < float(heartbeat_seconds) < float(lease_seconds):
    raise ValueError(f"workdir_lock.heartbeat_seconds={heartbeat_seconds} must be positive "
                     f"and below workdir_lock.lease_seconds={lease_seconds} (e.g. 30 and 180)")


def acquire(folder: str, *, lease_seconds: float, heartbeat_seconds: float,
            name: str = LOCK_NAME, target: Optional[str] = None,
            announce: Callable[[str], Any] = _say) -> Lock:
  """Creates the lock `<folder>/<name>` (and `folder` if missing), taking over
  a dead holder's lock (`announce`d in one line). Raises Held if a live
  process holds it; nothing in `folder` changes then. Starts no heartbeat."""
  check_times(lease_seconds, heartbeat_seconds)
  target = target or f"workdir {folder}"
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    raise WriteError(f"could not create {folder}: {reason(e)}") from e
  path = os.path.join(folder, name)
  me = identity()
  folder_id = _folder_id(folder)
  now = time.time()
  info = {"format": FORMAT, "version": 1, "token": uuid.uuid4().hex, **me, "folder_id": folder_id,
          "since": _when(now), "since_unix": now, "lease_seconds": float(lease_seconds),
          "heartbeat_seconds": float(heartbeat_seconds),
          "heartbeat": "this file's modification time, renewed every heartbeat_seconds",
          "command": " ".join(sys.argv)[:500]}
  data = (json.dumps(info, indent=1) + "\n").encode()
  took_over = None
  seen = None
  for _ in range(_ATTEMPTS):
    if _create(path, data):
      lock = Lock(path, info, target, took_over)
      if took_over:
        announce(took_over)
      return lock
    seen = _read(path)
    if seen is None:  # released meanwhile
      continue
    now = time.time()
    alive, why = _judge(seen, me, float(lease_seconds), now, folder_id)
    if alive:
      raise Held(_held_message(target, path, seen, me, float(lease_seconds), now), seen.info)
    # Announced if this process then creates the lock, whichever newcomer
    # removed the dead one (another may have moved it first).
    holder = _holder(seen.info) if seen.info else "an unreadable lock"
    took_over = f"took over the lock of {target} from {holder}: dead ({why})"
    _set_aside(path, seen)
  raise Held(f"{target}: {path} kept changing while this process tried to take it (several "
             "processes starting at once?); run the same command again",
             seen.info if seen else None)


_held: dict[str, list] = {}  # realpath of a lock file -> [Lock, nesting depth]
_held_guard = threading.Lock()


@contextlib.contextmanager
def hold(folder: str, *, lease_seconds: float, heartbeat_seconds: float,
         name: str = LOCK_NAME, target: Optional[str] = None,
         on_lost: Optional[Callable[[Lock], Any]] = None,
         announce: Callable[[str], Any] = _say) -> Iterator[Lock]:
  """`with hold(folder, ...) as lock:` this process is the folder's one
  writer (see the module's docstring); the lock is released when the block
  ends, however it ends. `on_lost(lock)` runs in the heartbeat thread if
  another process took the lock over (default: one `error:` line, exit code 2
  at once)."""
  key = os.path.realpath(os.path.join(folder, name))
  with _held_guard:
    entry = _held.get(key)
    if entry is not None:
      entry[1] += 1
  if entry is not None:
    try:
      yield entry[0]
    finally:
      with _held_guard:
        entry[1] -= 1
    return
  lock = acquire(folder, lease_seconds=lease_seconds, heartbeat_seconds=heartbeat_seconds,
                 name=name, target=target, announce=announce)
  with _held_guard:
    _held[key] = [lock, 1]
  try:
    lock.start_heartbeat(on_lost or _stop_process)
    yield lock
  finally:
    with _held_guard:
      _held.pop(key, None)
    lock.release()


def settings(config) -> dict:
  """hold()'s lease_seconds and heartbeat_seconds from config.workdir_lock."""
  cfg = require(config, "workdir_lock")
  out = {k: float(require(cfg, k, "workdir_lock")) for k in ("lease_seconds", "heartbeat_seconds")}
  check_times(**out)
  return out


def read(folder: str, name: str = LOCK_NAME) -> Optional[dict]:
  """The lock's JSON in `folder` (None if there is none or it is unreadable)."""
  seen = _read_once(os.path.join(folder, name))
  return seen.info if seen else None
