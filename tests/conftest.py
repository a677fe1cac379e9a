"""Test setup: 8 fake CPU devices (for sharding tests), no network, a compilation cache,
and prerequisites that CI must have.

A test that needs something a machine may lack says so with
`@pytest.mark.requires("what", ...)` (names in `PREREQUISITES`). Where it is
missing the test is skipped, except under CI=true: the CI machine is meant to
have every prerequisite, so there a missing one fails the test with one line
saying what is missing.
"""

import os
import pathlib

# Must happen before jax initialises its backend.
XLA_FLAGS = os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TFDS_DISABLE_NETWORK", "1")
# The tests compile hundreds of small programs and run each a few times: with
# XLA:CPU's backend at optimization level 0 (the same HLO, less LLVM work; the
# last bits may round differently where LLVM would fuse a multiply and an add)
# they compile ~40% faster. This process only: XLA reads XLA_FLAGS
# once, below, and the environment the tests' subprocesses (launch.train, the
# benchmarks) inherit goes back without it. ADAPTIVE_VISION_TEST_FAST_COMPILE=0
# compiles as the library does.
FAST_COMPILE = os.environ.get("ADAPTIVE_VISION_TEST_FAST_COMPILE", "1") != "0"
if FAST_COMPILE:
  os.environ["XLA_FLAGS"] = XLA_FLAGS + " --xla_backend_optimization_level=0"

import functools  # noqa: E402
import importlib.util  # noqa: E402

import jax  # noqa: E402
import pytest  # noqa: E402

from adaptive_vision.cache_dir import cache_dir  # noqa: E402

if FAST_COMPILE:
  jax.jit(lambda x: x + 1)(0).block_until_ready()  # XLA parses XLA_FLAGS here, once
  os.environ["XLA_FLAGS"] = XLA_FLAGS

jax.config.update("jax_threefry_partitionable", True)
# XLA:CPU compiles threefry's unrolled hash very slowly (a jitted ResNet-8 init:
# ~80 s with threefry, ~15 s with rbg on a loaded 2-core machine); the CPU
# backend's process settings make the same choice (adaptive_vision/cpu/process.py).
jax.config.update("jax_default_prng_impl", "rbg")

ROOT_CACHE = cache_dir()
# XLA:CPU compilation is most of the tests' time: compiled programs persist between
# test sessions (keyed by program, options and jaxlib), so a rerun of the inner
# loop compiles only what changed. CI's cache folder is new each run, so CI
# compiles everything. ADAPTIVE_VISION_TEST_COMPILE_CACHE=0 turns it off.
if os.environ.get("ADAPTIVE_VISION_TEST_COMPILE_CACHE", "1") != "0":
  jax.config.update("jax_compilation_cache_dir",
                    str(ROOT_CACHE.expanduser() / "test_compilation_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  if importlib.util.find_spec("filelock"):  # jax's eviction needs it
    jax.config.update("jax_compilation_cache_max_size", 2 << 30)  # bytes, least recently used go

ROOT = pathlib.Path(__file__).resolve().parent.parent
CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _native() -> str | None:
  if jax.default_backend() != "cpu":
    return "the native kernels are CPU code"
  from adaptive_vision.cpu.native import conv, decide, head, norm
  for module in (conv, norm, head, decide):
    reason = module.unavailable_reason()
    if reason:
      return f"native CPU kernels ({module.__name__}): {reason.splitlines()[0][:200]}"
  return None


def _torch() -> str | None:
  try:
    import torch  # noqa: F401
  except ImportError:
    return "torch (pip install -e '.[bench]')"
  return None


def _cifar10() -> str | None:
  from configs import common
  path = pathlib.Path(common.OFFLINE_CIFAR10)
  if not (path / "train.tar.gz").exists() or not (path / "test.tar.gz").exists():
    return f"the offline CIFAR-10 copy at {path}"
  return None


def _root() -> str | None:
  return None if os.geteuid() == 0 else "root (mount a tmpfs, chattr +i)"


def _gloo() -> str | None:
  try:
    from jax._src.lib import _jax
  except ImportError:  # layout changed: let the test run and show what happens
    return None
  if not hasattr(_jax, "make_gloo_tcp_collectives"):
    return "gloo CPU collectives in this jaxlib (multi-process CPU training)"
  return None


def _compiler() -> str | None:
  from adaptive_vision.cpu.native import build
  return None if build.compiler() else "a C++ compiler ($CXX, c++ or g++)"


def _glibc() -> str | None:
  from adaptive_vision.cpu import host_memory
  return None if host_memory._glibc() is not None else "glibc"


PREREQUISITES = {"native": _native, "torch": _torch, "cifar10": _cifar10, "root": _root,
                 "gloo": _gloo, "compiler": _compiler, "glibc": _glibc}


@functools.cache
def missing(name: str) -> str | None:
  """None when prerequisite `name` is here, else what is missing."""
  return PREREQUISITES[name]()


def unavailable(what: str) -> None:
  """A prerequisite found missing while the test runs (e.g. a mount refused):
  skip here, fail under CI=true, with one line saying what is missing."""
  if CI:
    pytest.fail(f"missing on the CI machine: {what}", pytrace=False)
  pytest.skip(f"missing here: {what}")


def require(name: str) -> None:
  """In a test body: skip (or, under CI=true, fail) when `name` is missing."""
  what = missing(name)
  if what:
    unavailable(what)


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: subprocess, whole-run, reliability and benchmark tests "
      "(deselect with -m 'not slow'; CI and the README's command run them)")
  config.addinivalue_line(
      "markers", "requires(*names): prerequisites of the test (conftest.PREREQUISITES); "
      "skipped where missing, failed under CI=true")


def pytest_runtest_setup(item):
  for mark in item.iter_markers(name="requires"):
    for name in mark.args:
      if name not in PREREQUISITES:
        raise ValueError(f"unknown prerequisite {name!r}; valid: {sorted(PREREQUISITES)}")
      require(name)
