"""What every launcher does at start: logging, JAX flags, clear errors."""

from __future__ import annotations

import contextlib
import logging
import sys
from typing import Optional, Sequence

from absl import app

from adaptive_vision.atomic import WriteError


def setup(distributed: bool = False, *, coordinator_address: Optional[str] = None,
          num_processes: Optional[int] = None, process_id: Optional[int] = None,
          local_device_ids: Optional[Sequence[int]] = None, cpu_devices: int = 0,
          workload: str = "train") -> None:
  """JAX settings every launcher wants; with `distributed`, joins the other processes.

  `jax.distributed.initialize` detects TPU pods, SLURM, Open MPI and Kubernetes
  by itself; the explicit arguments (the launcher's --coordinator_address,
  --num_processes, --process_id) are for everything else, e.g. several CPU
  processes on one machine. On CPU, cross-process collectives use gloo
  (jax's default `jax_cpu_collectives_implementation`).

  The backend's process settings come first (`adaptive_vision.backend.
  prepare_process`: on CPU hosts the allocator, compile options, PRNG,
  `cpu_devices` host devices, and for workload 'serve' -- a process that waits
  for each answer, as launch.predict -- synchronous dispatch).
  """
  import jax
  from adaptive_vision import backend
  backend.prepare_process(workload, cpu_devices=cpu_devices)
  if distributed:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes,
                  process_id=process_id, local_device_ids=local_device_ids)
    jax.distributed.initialize(**{k: v for k, v in kwargs.items() if v is not None})
  jax.config.update("jax_threefry_partitionable", True)
  logging.getLogger("absl").setLevel(logging.WARNING)


def config_from_params(path: str):
  """The config a parameters file of launch.export was trained with (the file
  describes itself), over the library's current defaults for fields it
  predates. Raises ValueError for a file that is not one."""
  import ml_collections
  from adaptive_vision import export
  from configs import common as config_common
  _, meta = export.read(path)

  def merge(base, stored):
    out = dict(base)
    for k, v in stored.items():
      out[k] = merge(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
    return out
  merged = merge(config_common.base_config().to_dict(), export.training_config(meta))
  return ml_collections.ConfigDict(merged)


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
