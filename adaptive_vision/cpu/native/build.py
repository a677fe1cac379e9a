"""Compiles the C++ kernels of this folder for this machine, once, and loads them.

The shared library is cached under $ADAPTIVE_VISION_CACHE (default
~/.cache/adaptive_vision)/native, named by a hash of everything that changes
the binary: the source and this folder's headers, the flags, the compiler's version, the jaxlib whose
FFI headers it includes and the CPU (the code is built with -march=native).
A build writes to a temporary file and renames it, so concurrent processes
never load a half-written library.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile

from adaptive_vision.cache_dir import cache_dir as cache_root

SOURCE_DIR = pathlib.Path(__file__).resolve().parent
FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-w")


class NativeUnavailable(RuntimeError):
  """The kernels cannot be built or loaded here (the message says why)."""


def compiler() -> str | None:
  """The C++ compiler: $CXX, else c++ or g++ or clang++ on PATH."""
  if os.environ.get("CXX"):
    return os.environ["CXX"]
  return next((c for c in ("c++", "g++", "clang++") if shutil.which(c)), None)


def cache_dir() -> pathlib.Path:
  """$ADAPTIVE_VISION_CACHE/native, else ~/.cache/adaptive_vision/native (the
  same root as the data cache's default)."""
  return cache_root("native")


def _cpu_identity() -> str:
  try:
    text = pathlib.Path("/proc/cpuinfo").read_text()
  except OSError:
    import platform
    return platform.processor() or platform.machine()
  keep = [l for l in text.splitlines() if l.split(":")[0].strip() in ("model name", "flags")]
  return "\n".join(dict.fromkeys(keep))  # one copy per distinct line


def _key(source: str, cxx: str, include: str) -> str:
  import jaxlib
  try:
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
  except (OSError, subprocess.SubprocessError) as e:
    raise NativeUnavailable(f"C++ compiler {cxx!r} does not run: {e}") from e
  h = hashlib.sha256()
  for part in (source, " ".join(FLAGS), version, jaxlib.__version__, include, _cpu_identity()):
    h.update(part.encode())
    h.update(b"\0")
  return h.hexdigest()[:16]


@functools.cache
def library(name: str = "conv_kernels") -> ctypes.CDLL:
  """The compiled `<name>.cc` of this folder, built on first use; raises
  NativeUnavailable (with the compiler's message) when it cannot be."""
  import jax
  cxx = compiler()
  if cxx is None:
    raise NativeUnavailable("no C++ compiler on PATH (set $CXX or install g++)")
  src = SOURCE_DIR / f"{name}.cc"
  include = jax.ffi.include_dir()
  headers = "".join(h.read_text() for h in sorted(SOURCE_DIR.glob("*.h")))
  key = _key(src.read_text() + headers, cxx, include)
  out = cache_dir() / f"{name}-{key}.so"
  if not out.exists():
    out.parent.mkdir(parents=True, exist_ok=True)
    logging.info("compiling %s for this CPU (once per machine): %s", src.name, out)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{include}", f"-I{SOURCE_DIR}", str(src), "-o", tmp]
    try:
      done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
      if done.returncode != 0:
        raise NativeUnavailable(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")
      os.replace(tmp, out)
    except (OSError, subprocess.SubprocessError) as e:
      raise NativeUnavailable(f"{' '.join(cmd)} failed: {e}") from e
    finally:
      if os.path.exists(tmp):
        os.unlink(tmp)
  try:
    return ctypes.CDLL(str(out))
  except OSError as e:
    raise NativeUnavailable(f"cannot load {out}: {e}") from e


@functools.cache
def register(name: str, symbols: tuple[str, ...]) -> None:
  """Builds `<name>.cc` and registers its FFI handlers `symbols` for the CPU."""
  import jax
  lib = library(name)
  for symbol in symbols:
    jax.ffi.register_ffi_target(symbol, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")


@functools.cache
def unavailable_reason(name: str, symbols: tuple[str, ...]) -> str | None:
  """None when `register(name, symbols)` succeeds on this backend, else why not
  (logged once: the callers then fall back to their XLA implementations)."""
  import jax
  if jax.default_backend() != "cpu":
    return f"the native kernels are CPU code; the backend is {jax.default_backend()}"
  try:
    register(name, symbols)
  except NativeUnavailable as e:
    logging.warning("native CPU kernels %s unavailable, using XLA's ops: %s", name, e)
    return str(e)
  return None


class Kernels:
  """The FFI handlers `targets` of `<name>.cc`: `register()` builds, loads and
  registers them (once); `unavailable_reason()` is None where they can run,
  else why not; `available()`. Each module of this folder has one."""

  def __init__(self, name: str, targets: tuple[str, ...]):
    self.name, self.targets = name, tuple(targets)

  def register(self) -> None:
    register(self.name, self.targets)

  def unavailable_reason(self) -> str | None:
    return unavailable_reason(self.name, self.targets)

  def available(self) -> bool:
    return self.unavailable_reason() is None


def float32_only(*dtypes) -> bool:
  """Whether every dtype is float32 (the kernels' only type)."""
  import jax.numpy as jnp
  return all(jnp.dtype(d) == jnp.float32 for d in dtypes)
