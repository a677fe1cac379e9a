"""adaptive_vision.host_memory: freed blocks are reused instead of faulted in again."""

import ctypes
import os
import subprocess
import sys

import pytest

from adaptive_vision import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Allocates, writes and frees 64 MiB five times; prints the minor page faults
# of the last four rounds.
_PROBE = """
import ctypes, ctypes.util, resource, sys
from adaptive_vision import host_memory
print("applied" if host_memory.keep_freed_memory() else "not applied")
if sys.argv[1] == "defaults":
  host_memory.glibc_defaults()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
n = 64 << 20
def once():
  p = libc.malloc(n)
  ctypes.memset(p, 1, n)
  libc.free(ctypes.c_void_p(p))
once()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  once()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _probe(mode, **env):
  proc = subprocess.run([sys.executable, "-c", _PROBE, mode], cwd=ROOT, capture_output=True,
                        text=True, env={**os.environ, **env}, timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]
  applied, faults = proc.stdout.split("\n")[:2]
  return applied, int(faults)


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only")
def test_kept_memory_is_reused_and_defaults_fault_it_in_again():
  applied, kept = _probe("keep")
  assert applied == "applied"
  _, default = _probe("defaults")
  pages = 4 * (64 << 20) // os.sysconf("SC_PAGE_SIZE")
  # glibc's defaults mmap each 64 MiB block afresh (at least one fault per
  # huge page, one per page without them); kept, the same pages serve again.
  assert default > 4 * 32 and kept < default / 10, (kept, default, pages)


@pytest.mark.skipif(host_memory._glibc() is None, reason="glibc only")
def test_the_environment_can_leave_the_allocator_alone():
  applied, _ = _probe("keep", ADAPTIVE_VISION_MALLOC="default")
  assert applied == "not applied"
