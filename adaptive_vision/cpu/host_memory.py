"""Host memory allocator settings for XLA:CPU programs (a process-wide edge).

Each XLA:CPU execution allocates its temporaries (hundreds of MB for a CIFAR
ResNet step at batch 128) and frees them at the end. With glibc's defaults
those blocks are mmap'd and unmapped on every call, so every step touches
fresh pages: ~90,000 minor page faults and ~0.2 s of kernel time per ERDE
teacher step on a 2-core EPYC. `keep_freed_memory()` has glibc serve them from
one heap that it never hands back, so the next step reuses the same pages:
the teacher step ran 1.27x faster, paired in one process
(results/bench_notes.md). The price: the process keeps its peak heap.

Only glibc (Linux) is changed; elsewhere both functions do nothing. Set
ADAPTIVE_VISION_MALLOC=default to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os

# mallopt parameters (glibc's malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


@functools.cache
def _glibc():
  name = ctypes.util.find_library("c")
  try:
    libc = ctypes.CDLL(name)
    libc.gnu_get_libc_version  # only glibc has it
    libc.mallopt  # noqa: B018
  except (OSError, AttributeError, TypeError):
    return None
  return libc


def keep_freed_memory() -> bool:
  """Freed blocks stay in the process for reuse: one arena (so memory freed by
  one thread serves the next allocation of another), no mmap'd blocks, no
  trimming. Call before the first JAX computation (the arena limit binds
  threads that have not allocated yet). Returns whether it was applied."""
  libc = _glibc()
  if libc is None or os.environ.get("ADAPTIVE_VISION_MALLOC", "keep") == "default":
    return False
  ok = libc.mallopt(_M_ARENA_MAX, 1) == 1
  ok &= libc.mallopt(_M_MMAP_MAX, 0) == 1
  ok &= libc.mallopt(_M_TRIM_THRESHOLD, ctypes.c_int(2 ** 31 - 1)) == 1
  return bool(ok)


def glibc_defaults() -> bool:
  """Back to glibc's mmap and trim defaults (the arena limit stays): the
  other side of an A/B in one process (results/bench_notes.md, kept heap pages)."""
  libc = _glibc()
  if libc is None:
    return False
  ok = libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX) == 1
  ok &= libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD) == 1
  libc.malloc_trim(0)
  return bool(ok)
