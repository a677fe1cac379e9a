"""One writer per folder (adaptive_vision/workdir_lock.py), without a trainer:
real holder processes (alive, killed), holders on another host (a lock file
naming another host, its heartbeat old or fresh), pid reuse, an unreadable
lock, the heartbeat, and newcomers racing for a dead holder's lock.

The whole-run scenarios (two `launch.train` on one workdir, a killed trainer
taken over, two-process jobs) are in tests/test_reliability.py and
tests/test_multiprocess.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adaptive_vision import workdir_lock as wl

REPO = Path(__file__).resolve().parents[1]
TIMES = dict(lease_seconds=180.0, heartbeat_seconds=30.0)

# A process that holds the lock of argv[1] until SIGTERM (released then) or
# SIGKILL (left behind), printing "held" once it has it.
HOLDER = """
import signal, sys, time
from adaptive_vision import workdir_lock
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
with workdir_lock.hold(sys.argv[1], lease_seconds=180, heartbeat_seconds=30,
                       name=(sys.argv[2:] or [".lock"])[0]):
  print("held", flush=True)
  time.sleep(600)
"""


def _env():
  path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
  return {**os.environ, "PYTHONPATH": path}


def start_holder(folder, name=wl.LOCK_NAME, env=None):
  """A live process holding `folder`'s lock, once it has it."""
  proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder), name], env=env or _env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  line = proc.stdout.readline().strip()
  if line != "held":
    proc.kill()
    raise AssertionError(f"the holder did not take the lock: {line} {proc.stderr.read()}")
  return proc


@pytest.fixture
def holder():
  """holder(folder) -> a live process holding folder's lock."""
  procs = []

  def start(folder, name=wl.LOCK_NAME):
    procs.append(start_holder(folder, name))
    return procs[-1]
  yield start
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
    proc.wait()


def snapshot(folder):
  """Every entry under `folder`: its bytes (files) and modification time."""
  out = {}
  for root, dirs, files in os.walk(folder):
    for name in dirs + files:
      path = os.path.join(root, name)
      st = os.stat(path)
      data = Path(path).read_bytes() if name in files else None
      out[os.path.relpath(path, folder)] = (data, st.st_mtime_ns)
  return out, os.stat(folder).st_mtime_ns


def fake_lock(folder, *, mtime_age=0.0, **fields):
  """A lock file as another process would have written it."""
  info = {"format": wl.FORMAT, "version": 1, "token": "t" * 32, **wl.identity(),
          "since": "2026-01-01 00:00:00 UTC", "since_unix": time.time() - 600, **TIMES}
  info.update(fields)
  path = os.path.join(folder, wl.LOCK_NAME)
  Path(path).write_text(json.dumps(info))
  t = time.time() - mtime_age
  os.utime(path, (t, t))
  return path, info


def test_hold_creates_the_lock_and_removes_it_however_the_block_ends(tmp_path):
  folder = tmp_path / "run"  # missing: created to hold the lock
  with wl.hold(str(folder), **TIMES) as lock:
    info = wl.read(str(folder))
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    assert info["token"] == lock.info["token"] and info["lease_seconds"] == 180
    assert lock.took_over is None
  assert os.listdir(folder) == []
  with pytest.raises(KeyError):
    with wl.hold(str(folder), **TIMES):
      raise KeyError("boom")
  assert os.listdir(folder) == []


def test_nested_hold_in_one_process_shares_the_lock(tmp_path):
  with wl.hold(str(tmp_path), **TIMES) as outer:
    with wl.hold(str(tmp_path), **TIMES) as inner:
      assert inner is outer
    assert wl.read(str(tmp_path))["token"] == outer.info["token"]  # the inner exit keeps it
  assert wl.read(str(tmp_path)) is None


def test_a_live_holder_refuses_a_second_process_which_changes_nothing(tmp_path, holder):
  (tmp_path / "checkpoints").mkdir()
  (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
  proc = holder(tmp_path)
  before = snapshot(tmp_path)
  with pytest.raises(wl.Held) as err:
    wl.acquire(str(tmp_path), **TIMES)
  message = str(err.value)
  assert "\n" not in message
  assert message.startswith(f"workdir {tmp_path} is in use by pid {proc.pid} on host "
                            f"{socket.gethostname()}, since 20"), message
  assert f"kill {proc.pid}" in message and f"remove {tmp_path}/.lock" in message
  assert err.value.holder["pid"] == proc.pid
  assert snapshot(tmp_path) == before
  proc.send_signal(signal.SIGTERM)  # a holder that ends releases the lock
  assert proc.wait(timeout=30) == 0
  assert sorted(os.listdir(tmp_path)) == ["checkpoints", "metrics.jsonl"]


def test_a_killed_holder_is_taken_over_in_one_line(tmp_path, holder):
  proc = holder(tmp_path)
  proc.kill()
  proc.wait()
  dead = wl.read(str(tmp_path))
  assert dead["pid"] == proc.pid  # SIGKILL left the lock behind
  said = []
  with wl.hold(str(tmp_path), announce=said.append, **TIMES) as lock:
    assert wl.read(str(tmp_path))["pid"] == os.getpid()
  assert said == [lock.took_over]
  assert said[0] == (f"took over the lock of workdir {tmp_path} from pid {proc.pid} on host "
                     f"{socket.gethostname()}, since {dead['since']}: dead (the process is gone)")
  assert os.listdir(tmp_path) == []  # no set-aside file left


def test_a_lock_copied_with_its_folder_does_not_hold_the_copy(tmp_path, holder):
  proc = holder(tmp_path / "run")
  shutil.copytree(tmp_path / "run", tmp_path / "copy")  # e.g. to fork a running job
  assert wl.read(str(tmp_path / "copy"))["pid"] == proc.pid
  with wl.hold(str(tmp_path / "copy"), announce=lambda _: None, **TIMES) as lock:
    assert lock.took_over.endswith("dead (a copy: it was made for another folder)")
  with pytest.raises(wl.Held, match=f"in use by pid {proc.pid}"):  # the original is still held
    wl.acquire(str(tmp_path / "run"), **TIMES)


def test_a_reused_pid_is_not_the_holder(tmp_path):
  me = wl.identity()
  # This process's pid, but another start time: the holder was an older process.
  fake_lock(str(tmp_path), pid=os.getpid(), start_ticks=me["start_ticks"] - 1)
  with wl.hold(str(tmp_path), announce=lambda _: None, **TIMES) as lock:
    assert "the process is gone" in lock.took_over
  # The same pid and start time: alive (here, this very process).
  fake_lock(str(tmp_path), pid=os.getpid())
  with pytest.raises(wl.Held, match=f"in use by pid {os.getpid()} on host"):
    wl.acquire(str(tmp_path), **TIMES)


def test_a_holder_on_another_host_counts_until_its_lease_ends(tmp_path):
  """On another host the pid means nothing here: the heartbeat (the lock
  file's modification time) and the holder's lease decide."""
  other = dict(host="node-b.cluster", pid=4242, boot_id="another-boot", job="SLURM_JOB_ID=777",
               lease_seconds=120.0)
  path, info = fake_lock(str(tmp_path), mtime_age=50, **other)
  before = snapshot(tmp_path)
  with pytest.raises(wl.Held) as err:
    wl.acquire(str(tmp_path), **TIMES)
  assert str(err.value) == (
      f"workdir {tmp_path} is in use by pid 4242 on host node-b.cluster, job SLURM_JOB_ID=777, "
      f"since {info['since']}, last heartbeat 50 s ago (if it has died, its lease of 120 s ends "
      f"in 70 s): wait for it to finish or stop it on node-b.cluster, or, if you are sure it is "
      f"dead, remove {path}; then run the same command again")
  assert snapshot(tmp_path) == before
  # Our own host name but another boot (or pid namespace): also the lease.
  fake_lock(str(tmp_path), mtime_age=50, boot_id="another-boot", pid=1)
  with pytest.raises(wl.Held, match="last heartbeat 50 s ago"):
    wl.acquire(str(tmp_path), **TIMES)
  # No heartbeat for longer than the holder's lease (its own, not ours): dead.
  fake_lock(str(tmp_path), mtime_age=121, **other)
  said = []
  with wl.hold(str(tmp_path), announce=said.append, **TIMES):
    pass
  assert said == [f"took over the lock of workdir {tmp_path} from pid 4242 on host node-b.cluster, "
                  f"job SLURM_JOB_ID=777, since {info['since']}: dead (no heartbeat for 121 s, "
                  "lease 120 s)"]


def test_an_unreadable_lock_counts_as_alive_for_one_lease(tmp_path):
  path = tmp_path / ".lock"
  path.write_text("")  # its creator died between creating and writing it, or is writing it
  t = time.time() - 10
  os.utime(path, (t, t))
  with pytest.raises(wl.Held, match=r"\.lock exists but cannot be read \(written 10 s ago; it "
                                    r"counts as dead 170 s from now\)"):
    wl.acquire(str(tmp_path), **TIMES)
  t = time.time() - 200
  os.utime(path, (t, t))
  with wl.hold(str(tmp_path), announce=lambda _: None, **TIMES) as lock:
    assert lock.took_over.endswith("from an unreadable lock: dead (unreadable for 200 s "
                                   "(lease 180 s))")


def test_the_heartbeat_renews_the_lease_and_stops_a_holder_taken_over(tmp_path):
  lost = []
  with wl.hold(str(tmp_path), lease_seconds=5, heartbeat_seconds=0.1, on_lost=lost.append) as lock:
    path = lock.path
    os.utime(path, (0, 0))
    time.sleep(0.5)
    assert time.time() - os.stat(path).st_mtime < 1  # renewed
    os.remove(path)  # removed by hand: made again
    time.sleep(0.5)
    assert wl.read(str(tmp_path))["token"] == lock.info["token"]
    # Another process took it over (as a newcomer on another host does after a lease).
    other = dict(json.loads(Path(path).read_text()), token="x" * 32, pid=4242, host="node-b")
    Path(path).write_text(json.dumps(other))
    deadline = time.time() + 10
    while not lost and time.time() < deadline:
      time.sleep(0.05)
    assert lost == [lock] and lock.lost_to["pid"] == 4242
  assert wl.read(str(tmp_path))["pid"] == 4242  # the release left the new holder's lock


def test_a_live_lock_moved_aside_by_mistake_is_put_back(tmp_path):
  """Two newcomers judged the same lock dead; the first replaced it; the
  second's rename then moves the first's live lock: it must go back."""
  path, _ = fake_lock(str(tmp_path), pid=4242, host="node-b", mtime_age=500)
  stale = wl._read(path)
  _, live = fake_lock(str(tmp_path), token="n" * 32)  # the first newcomer's lock
  live_bytes = Path(path).read_bytes()
  assert not wl._set_aside(path, stale)
  assert Path(path).read_bytes() == live_bytes
  assert os.listdir(tmp_path) == [".lock"]
  assert wl._set_aside(path, wl._read(path))  # what it judged is what it moves
  assert os.listdir(tmp_path) == []


RACER = """
import os, sys, time
from adaptive_vision import workdir_lock
folder, barrier, n = sys.argv[1], sys.argv[2], int(sys.argv[3])

def wait_for(prefix):  # every racer has written its marker (or 60 s passed)
  deadline = time.time() + 60
  while sum(f.startswith(prefix) for f in os.listdir(barrier)) < n and time.time() < deadline:
    time.sleep(0.005)

# Start together once all racers are imported (imports take seconds on a busy
# machine), and hold the lock until all have tried: a racer that came after the
# winner had released would rightly win a free lock and prove nothing.
open(os.path.join(barrier, f"ready-{os.getpid()}"), "w").close()
wait_for("ready-")
try:
  with workdir_lock.hold(folder, lease_seconds=180, heartbeat_seconds=30,
                         announce=lambda line: print("took over", flush=True)):
    print("won", flush=True)
    open(os.path.join(barrier, f"tried-{os.getpid()}"), "w").close()
    wait_for("tried-")
except workdir_lock.Held as e:
  print("held:", e.holder["pid"] if e.holder else None, flush=True)
  open(os.path.join(barrier, f"tried-{os.getpid()}"), "w").close()
"""


@pytest.mark.slow
@pytest.mark.parametrize("holder_state", ["killed", "another host, lease over"])
def test_newcomers_racing_for_a_dead_holders_lock_one_wins(tmp_path, holder, holder_state):
  """Six processes start at the same instant on a dead holder's lock, five
  rounds: exactly one takes it over, the others name that one."""
  from test_reliability import record  # pylint: disable=import-outside-toplevel
  for round_ in range(5):
    folder = tmp_path / f"round{round_}"
    folder.mkdir()
    if holder_state == "killed":
      proc = holder(folder)
      proc.kill()
      proc.wait()
    else:
      fake_lock(str(folder), host="node-b", pid=4242, mtime_age=500)
    barrier = tmp_path / f"barrier{round_}"
    barrier.mkdir()
    racers = [subprocess.Popen([sys.executable, "-c", RACER, str(folder), str(barrier), "6"],
                               env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True) for _ in range(6)]
    outs = [(p.pid, *p.communicate(timeout=120)) for p in racers]
    winners = [pid for pid, out, _ in outs if "won" in out]
    assert len(winners) == 1, outs
    # The winner announces the takeover if it saw the dead lock (a newcomer
    # that started after another had removed it finds none).
    assert sum("took over" in out for _, out, _ in outs) <= 1, outs
    for pid, out, err in outs:
      if pid != winners[0]:
        assert out.strip() == f"held: {winners[0]}", (out, err)
    assert os.listdir(folder) == []
    record("lock_race", holder=holder_state, round=round_, newcomers=len(outs),
           winners=len(winners), winner_announced=any("took over" in out for _, out, _ in outs))


def test_times_are_checked_and_read_from_the_config():
  from configs import common
  c = common.base_config()
  assert wl.settings(c) == {"lease_seconds": 180.0, "heartbeat_seconds": 30.0}
  c.workdir_lock.heartbeat_seconds = 200.0
  with pytest.raises(ValueError, match="heartbeat_seconds=200.0 must be positive and below "
                                       "workdir_lock.lease_seconds=180.0"):
    wl.settings(c)
  del c["workdir_lock"]
  with pytest.raises(ValueError, match="config key workdir_lock is missing"):
    wl.settings(c)
