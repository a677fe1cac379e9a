"""Result files are replaced whole: an interrupted write (an exception, a full
disk, a SIGKILL) leaves the previous file, loadable, and no temporary file that
a result pattern (`*.npz`, `*.json`, `*.md`, `*.png`) picks up."""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from adaptive_vision import atomic
from adaptive_vision.eval import files as reporting_files, logits as logits_lib, markdown as markdown_lib, report as report_lib

REPO = Path(__file__).resolve().parents[1]
REPEATS = int(os.environ.get("RELIABILITY_REPEATS", "1"))


def results(folder):
  """Files a reader of results would pick up."""
  return sorted(os.path.basename(p) for ext in ("npz", "json", "md", "png", "txt")
                for p in glob.glob(os.path.join(folder, f"*.{ext}")))


def everything(folder):
  return sorted(os.listdir(folder))


class Boom(Exception):
  pass


def _json_that_fails_halfway(path):
  big = {f"k{i}": list(range(50)) for i in range(2000)}
  big["zzz"] = object()  # json.dump writes chunk by chunk, then fails here
  atomic.write_json(path, big, default=lambda o: (_ for _ in ()).throw(Boom()))


class _FailingArray:
  def __array__(self, dtype=None, copy=None):
    raise Boom()


def _npz_that_fails_halfway(path):
  atomic.save_npz(path, first=np.arange(500_000), second=_FailingArray())


def _bytes_that_fail_halfway(path):
  with atomic.replace(path, "wb") as f:
    f.write(b"x" * 100_000)
    raise Boom()


def _figure_that_fails_halfway(path):
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure()
  FigureCanvasAgg(fig)
  fig.add_subplot(1, 1, 1).plot([0, 1], [0, 1])
  fig.canvas.mpl_connect("draw_event", lambda _: (_ for _ in ()).throw(Boom()))
  atomic.save_figure(path, fig)


@pytest.mark.parametrize("name,write", [
    ("out.json", _json_that_fails_halfway), ("out.npz", _npz_that_fails_halfway),
    ("out.txt", _bytes_that_fail_halfway), ("out.png", _figure_that_fails_halfway)])
def test_exception_mid_write_keeps_previous_file_and_no_temp(tmp_path, name, write):
  path = tmp_path / name
  path.write_bytes(b"previous")
  with pytest.raises(Boom):
    write(path)
  assert path.read_bytes() == b"previous"
  assert everything(tmp_path) == [name]  # the temporary file is gone


def test_helpers_write_what_they_are_given(tmp_path):
  atomic.write_json(tmp_path / "a.json", {"x": [1, 2]}, indent=1)
  assert json.loads((tmp_path / "a.json").read_text()) == {"x": [1, 2]}
  atomic.write_text(tmp_path / "a.md", "# t\n")
  assert (tmp_path / "a.md").read_text() == "# t\n"
  atomic.save_npz(tmp_path / "a.npz", x=np.arange(3))
  with np.load(tmp_path / "a.npz") as z:
    np.testing.assert_array_equal(z["x"], np.arange(3))
  atomic.copy_file(tmp_path / "a.npz", tmp_path / "b.npz")
  assert (tmp_path / "b.npz").read_bytes() == (tmp_path / "a.npz").read_bytes()
  assert everything(tmp_path) == ["a.json", "a.md", "a.npz", "b.npz"]


def test_unwritable_target_is_a_write_error_naming_the_path(tmp_path):
  (tmp_path / "a_file").write_text("")
  path = tmp_path / "a_file" / "report.json"  # its folder cannot exist: a file is in the way
  with pytest.raises(atomic.WriteError, match=f"could not write {path}: "):
    atomic.write_json(path, {})
  # A folder that is merely missing is made (results of a new study go to new folders).
  assert json.loads(open(atomic.write_json(tmp_path / "new" / "r.json", {"a": 1})).read()) == {"a": 1}
  assert isinstance(atomic.WriteError("x"), OSError)  # `except OSError` still catches it


def test_reason_reads_tensorstore_messages():
  err = ValueError("RESOURCE_EXHAUSTED: Error writing ... Failed to write 6 bytes to file 4: "
                   "No space left on device [os_error_code='28']")
  assert atomic.reason(err) == os.strerror(28)
  assert atomic.reason(OSError(30, "Read-only file system")) == "Read-only file system"


def test_leftovers_of_dead_processes_are_removed_on_the_next_write(tmp_path):
  dead = subprocess.Popen([sys.executable, "-c", "pass"])
  dead.wait()
  host = atomic._host()
  stale = tmp_path / f".r.json.tmp-{host}-{dead.pid}-0123abcd"
  alive = tmp_path / f".r.json.tmp-{host}-{os.getppid()}-0123abcd"  # a live process's
  other = tmp_path / f".r.json.tmp-otherhost-{dead.pid}-0123abcd"  # maybe alive there
  for p in (stale, alive, other):
    p.write_text('{"cut": ')
  atomic.write_json(tmp_path / "r.json", {"ok": True})
  assert not stale.exists() and alive.exists() and other.exists()
  assert results(tmp_path) == ["r.json"]


# ----------------------------------------------------------------------------- SIGKILL

_WRITER = r"""
import sys, numpy as np
out = sys.argv[1]
versions = [VERSION(v) for v in (0, 1)]
print("ready", flush=True)
i = 0
while True:
  logits, labels, macs, reports = versions[i % 2]
  logits_lib.save_logits(out + "/test_logits.npz", logits, labels, macs)
  reporting_files.write_report(out, reports, title="kill test")
  i += 1
"""


def _version(v):
  """Two distinguishable results: logits [2, 20000, 10] filled with v, and their report."""
  rng = np.random.default_rng(v)
  logits = (rng.normal(size=(2, 20000, 10)) + 10 * v).astype(np.float32)
  labels = rng.integers(0, 10, 20000)
  macs = np.array([1e6, 2e6])
  reports = {"m": report_lib.early_exit_report(
      logits_lib.ExitLogits(logits, labels, macs), num_points=5, name="m")}
  return logits, labels, macs, reports


@pytest.mark.slow
@pytest.mark.parametrize("repeat", range(REPEATS))
def test_sigkill_mid_write_leaves_previous_or_new_file(tmp_path, repeat):
  import inspect
  code = inspect.getsource(_version).replace("def _version", "def VERSION") + _WRITER
  code = "import numpy as np\nfrom adaptive_vision.eval import files as reporting_files, logits as logits_lib, report as report_lib\n" + code
  out = tmp_path / "out"
  out.mkdir()
  versions = [_version(v) for v in (0, 1)]
  markdown = [markdown_lib.report_markdown(json.loads(json.dumps(report_lib.jsonable(v[3]))),
                                        "kill test") for v in versions]
  rng = random.Random()
  kills, states = 5, []
  for k in range(kills):
    proc = subprocess.Popen([sys.executable, "-c", code, str(out)], cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
      assert proc.stdout.readline().strip() == b"ready", proc.stderr.read()[-2000:]
      time.sleep(rng.uniform(0.05, 2.0))  # a few writes of each file go by
    finally:
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    names = results(out)
    temps = [n for n in everything(out) if n not in names]
    assert all(n.startswith(".") and ".tmp-" in n for n in temps), temps
    if not names:
      continue  # killed before the first file was complete: nothing to read, nothing cut short
    assert set(names) <= {"test_logits.npz", "report.json", "report.md", "accuracy_vs_macs.png"}
    seen = {}
    if "test_logits.npz" in names:
      got = logits_lib.load_logits(out / "test_logits.npz")
      seen["npz"] = [v for v in (0, 1) if np.array_equal(got.exit_logits, versions[v][0])]
      assert seen["npz"], "the logits file is neither version"
    if "report.json" in names:
      got = json.loads((out / "report.json").read_text())["reports"]
      seen["json"] = [v for v in (0, 1) if got == report_lib.jsonable(versions[v][3])]
      assert seen["json"], "report.json is neither version"
    if "report.md" in names:
      seen["md"] = [v for v in (0, 1) if (out / "report.md").read_text() == markdown[v]]
      assert seen["md"], "report.md is neither version"
    if "accuracy_vs_macs.png" in names:
      from PIL import Image
      with Image.open(out / "accuracy_vs_macs.png") as im:
        im.load()  # a cut-short PNG raises here
    states.append({"names": names, "temps": len(temps), **seen})
  # The next write of each file clears what the killed writers left.
  logits_lib.save_logits(out / "test_logits.npz", *versions[0][:3])
  reporting_files.write_report(out, versions[0][3], title="kill test")
  assert everything(out) == results(out)
  from test_reliability import record
  record("atomic_sigkill", repeat=repeat, kills=kills,
         temps_left=[s["temps"] for s in states], files=[len(s["names"]) for s in states])
