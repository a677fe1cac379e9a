"""What every launcher does at start: logging, JAX flags, clear errors."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from typing import Optional, Sequence

from absl import app

from adaptive_vision import host_memory
from adaptive_vision.atomic import WriteError


def setup(distributed: bool = False, *, coordinator_address: Optional[str] = None,
          num_processes: Optional[int] = None, process_id: Optional[int] = None,
          local_device_ids: Optional[Sequence[int]] = None, cpu_devices: int = 0,
          one_call_at_a_time: bool = False) -> None:
  """JAX settings every launcher wants; with `distributed`, joins the other processes.

  `jax.distributed.initialize` detects TPU pods, SLURM, Open MPI and Kubernetes
  by itself; the explicit arguments (the launcher's --coordinator_address,
  --num_processes, --process_id) are for everything else, e.g. several CPU
  processes on one machine. On CPU, cross-process collectives use gloo
  (jax's default `jax_cpu_collectives_implementation`).

  `cpu_devices` > 0 splits a CPU host into that many XLA devices, over which
  the trainer's mesh shards the batch. XLA:CPU spreads one op over the cores
  poorly for the small matrices of CIFAR models, while independent per-device
  programs keep the cores busy: 2 or 4 devices made the CIFAR ViT train step
  1.15-1.4x faster on 2 cores (results/bench_notes.md). Ignored on GPU/TPU.

  `one_call_at_a_time`: for a process that waits for the answer of every
  call before it makes the next (launch.predict, one image per call). The CPU
  then runs each program on the calling thread instead of handing it to a
  dispatch thread: at batch 1 that hand-off is a large share of a call
  (results/bench_notes.md). A trainer keeps the default, whose asynchronous
  steps let the input pipeline run ahead. Must come before the first
  computation (the CPU client reads it once).
  """
  import jax
  if one_call_at_a_time:
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  if _nothing_but_cpu():
    # Else JAX tries to load libtpu.so first and logs that it failed to.
    jax.config.update("jax_platforms", "cpu")
    # Before the first computation creates XLA's threads: XLA:CPU's per-step
    # temporaries then reuse the same pages (adaptive_vision/host_memory.py).
    host_memory.keep_freed_memory()
  if cpu_devices:
    if cpu_devices < 0:
      raise ValueError(f"cpu_devices={cpu_devices}; give a positive count or 0 for JAX's default")
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
  if distributed:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, local_device_ids=local_device_ids)
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
  jax.config.update("jax_threefry_partitionable", True)
  # RngBitGenerator keys: deterministic like threefry but far cheaper for
  # XLA:CPU to compile (a jitted ResNet init: ~15 s instead of ~80 s here).
  jax.config.update("jax_default_prng_impl", "rbg")
  logging.getLogger("absl").setLevel(logging.WARNING)


def _nothing_but_cpu() -> bool:
  """True when JAX could only ever run on the CPU here and the user chose no
  platform: no TPU library (the libtpu package or TPU_LIBRARY_PATH), no TPU chip
  on the PCI bus, no PJRT plugin (CUDA, ROCm, ... come as `jax_plugins`)."""
  import glob
  import importlib.metadata
  import importlib.util
  import pkgutil
  import jax
  if "JAX_PLATFORMS" in os.environ or jax.config.jax_platforms:
    return False
  if any(os.environ.get(v) for v in ("TPU_LIBRARY_PATH", "PJRT_NAMES_AND_LIBRARY_PATHS")):
    return False
  if importlib.util.find_spec("libtpu") is not None:
    return False
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(vendor) as f:
        if f.read().strip() == "0x1ae0":  # Google: a TPU
          return False
    except OSError:
      pass
  namespace = importlib.util.find_spec("jax_plugins")
  if namespace is not None and any(pkgutil.iter_modules(namespace.submodule_search_locations)):
    return False
  return not importlib.metadata.entry_points(group="jax_plugins")


def fail(message: str, code: int = 2):
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(code)


@contextlib.contextmanager
def clear_errors():
  """A user's mistake (a bad value, a missing file) ends the program with one
  line and exit code 2; a failed write (disk full, read-only folder) with code
  4, the previous files standing."""
  try:
    yield
  except (ValueError, FileNotFoundError) as e:
    fail(str(e))
  except WriteError as e:
    fail(f"{e}; free space (or make the folder writable) and run the same command again",
         code=4)


def _one_line(error: BaseException) -> str:
  text = str(error)
  if "Traceback (most recent call last)" in text:
    # A config file's get_config raised: keep the flag and the error's last line.
    lines = [l for l in text.splitlines() if l.strip()]
    text = text.split("Traceback", 1)[0] + lines[-1].strip()
  return " ".join(text.split())


def _config_error(error: BaseException, argv) -> str:
  # ml_collections wraps a KeyError (unknown field, with a "Did you mean"
  # suggestion after a newline) in an AttributeError.
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]
  if isinstance(error, KeyError) and error.args:
    first, _, rest = str(error.args[0]).partition("\n")
    key = first.strip("'\"")
    message = " ".join(f"unknown field {first}{'; ' + rest if rest.strip() else ''}".split())
  else:
    message = _one_line(error)
    key = message.split()[0].strip("'\"") if message else ""
  culprits = [a for a in argv[1:] if a.startswith("--config.") and
              key in a.split("=", 1)[0].split(".")]
  where = f"{culprits[0]}: " if culprits else ""
  return f"{where}{message} (check --config.* overrides against the config file's fields)"


def _parse_flags(argv):
  """Parses flags (and with them the config file and its --config.* overrides);
  any mistake ends the program with one line on stderr and exit code 2."""
  from absl import flags
  try:
    argv = flags.FLAGS(argv)
  except flags.Error as e:
    fail(_one_line(e))
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    fail(_config_error(e, argv))
  for name in ("config",):
    if name in flags.FLAGS:
      try:  # config_flags defers "file not found" until the config is first used
        getattr(flags.FLAGS[name].value, "keys", None)
      except OSError as e:
        fail(f"--{name}: {_one_line(e)}")
  return argv


def run(main):
  """absl.app.run, with flag and config errors (unknown keys, wrong types) shown as one line."""
  app.run(main, flags_parser=_parse_flags)
