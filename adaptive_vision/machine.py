"""What a figure was measured on: the CPU model, its family and widest vector
extension (CPUs sold under one name differ by 3x in speed ratios), cores, OS.

Used by the training loop (one record per process start, so a run resumed on
other machines says which trained which steps), the run summaries and the
benchmarks. Reads /proc/cpuinfo; elsewhere falls back to `platform`.
"""

from __future__ import annotations

import functools
import os
import platform
from typing import Optional


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict[str, str]:
  """The first processor's fields of /proc/cpuinfo, read once; {} elsewhere."""
  fields: dict[str, str] = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if not line.strip():
          break  # the end of the first processor's block
        key, sep, value = line.partition(":")
        if sep:
          fields.setdefault(key.strip(), value.strip())
  except OSError:
    pass
  return fields


def _cpuinfo_field(name: str) -> Optional[str]:
  return _cpuinfo().get(name)


def cpu_model() -> str:
  return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_flags() -> set[str]:
  return set((_cpuinfo_field("flags") or "").split())


def cpu_family() -> Optional[int]:
  value = _cpuinfo_field("cpu family")
  return int(value) if value and value.isdigit() else None


def vector_extension(flags: set[str]) -> Optional[str]:
  """The widest SIMD extension among `flags` (AMX, AVX-512, AVX2, AVX), or None."""
  for flag, name in (("amx_tile", "AMX"), ("avx512f", "AVX-512"), ("avx2", "AVX2"),
                     ("avx", "AVX")):
    if flag in flags:
      return name
  return None


def describe() -> str:
  """One line, e.g. 'AMD EPYC (family 25, AVX-512), 2 cores, Linux x86_64'."""
  family = cpu_family()
  details = [d for d in (family is not None and f"family {family}",
                         vector_extension(cpu_flags())) if d]
  cpu = cpu_model() + (f" ({', '.join(details)})" if details else "")
  return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
