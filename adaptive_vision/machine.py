"""What a figure was measured on: the CPU model, its family and widest vector
extension (CPUs sold under one name differ by 3x in speed ratios), cores, OS.

Used by the training loop (one record per process start, so a run resumed on
other machines says which trained which steps), the run summaries and the
benchmarks. Reads /proc/cpuinfo; elsewhere falls back to `platform`.
"""

from __future__ import annotations

import os
import platform
from typing import Optional


def _cpuinfo_field(name: str) -> Optional[str]:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, sep, value = line.partition(":")
        if sep and key.strip() == name:
          return value.strip()
  except OSError:
    pass
  return None


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
  details = [f"family {cpu_family()}" if cpu_family() is not None else None,
             vector_extension(cpu_flags())]
  details = [d for d in details if d]
  cpu = cpu_model() + (f" ({', '.join(details)})" if details else "")
  return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"
