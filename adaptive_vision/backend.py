"""The run's backend: chosen once, from the config and the mesh, then handed on.

On GPU and TPU the models are plain flax and programs compile with XLA's
defaults; nothing CPU-specific is imported. On CPU, `adaptive_vision.cpu`
supplies faster layers with the same variables, its compile options and
process settings.

For a program that imports the models and jits its own steps, one call
before its first computation gives it what the launchers use:

    from adaptive_vision import backend, models
    be = backend.setup()                       # 'train' (default) or 'serve'
    model = models.build(model_cfg, layers=be.layers)
    step = jax.jit(train_step)                 # gets the CPU compile options too

The launchers do the same in two halves: `prepare_process` before JAX starts,
and `choose(config.backend, mesh, workload)` once the mesh is known (the
trainer's `train.build`, evaluation, export and prediction).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Optional

from adaptive_vision.models.layers import PLAIN, Layers

WORKLOADS = ("train", "serve")


@dataclasses.dataclass(frozen=True)
class Backend:
  """What one run's programs are built and compiled with.

  platform: 'cpu', 'gpu' or 'tpu'. layers: handed to `models.build`.
  compiler_options: for `jit` (None: XLA's defaults), as sorted items.
  decide: the single-dispatch cascade's exit-decision kernel, or None (XLA ops).
  choices: the resolved implementation switches (CPU; {} elsewhere).
  """
  platform: str
  workload: str = "train"
  layers: Layers = PLAIN
  compiler_options: Optional[tuple] = None
  decide: Optional[Callable] = None
  choices: Any = ()

  def jit(self, fn, **kwargs):
    """`jax.jit(fn, **kwargs)` with this backend's compile options."""
    import jax
    options = dict(self.compiler_options) if self.compiler_options else None
    return jax.jit(fn, compiler_options=options, **kwargs)

  def describe(self) -> str:
    what = ", ".join(f"{k} {v}" for k, v in dict(self.choices).items())
    return f"{self.platform} ({self.workload}){': ' + what if what else ''}"


def _check_workload(workload: str) -> None:
  if workload not in WORKLOADS:
    raise ValueError(f"workload {workload!r}; use one of {WORKLOADS}")


def _platform(mesh) -> str:
  import jax
  if mesh is not None:
    return mesh.devices.flat[0].platform
  return jax.default_backend()


def choose(options=None, mesh=None, workload: str = "train") -> Backend:
  """The backend of programs on `mesh` (default: programs on one device, the
  default device, as a plain `jax.jit` without shardings compiles them).

  `options`: the config's `backend` section ({switch: implementation}, 'auto'
  for the default; see adaptive_vision/cpu); read only on CPU.
  """
  _check_workload(workload)
  platform = _platform(mesh)
  if platform != "cpu":
    return Backend(platform=platform, workload=workload)
  from adaptive_vision import cpu
  from adaptive_vision.cpu import compiler
  num_devices = mesh.devices.size if mesh is not None else 1
  chosen = cpu.resolve(dict(options or {}), num_devices)
  options_ = compiler.options(workload)
  return Backend(platform="cpu", workload=workload, layers=cpu.layers(chosen),
                 compiler_options=tuple(sorted(options_.items())) if options_ else None,
                 decide=cpu.decide(chosen), choices=tuple(chosen.items()))


def prepare_process(workload: str = "train", *, cpu_devices: int = 0) -> None:
  """Settings that must precede JAX's first computation. On hosts where JAX
  can only run on the CPU: `adaptive_vision.cpu.process.prepare`; elsewhere
  only `cpu_devices` is refused if given."""
  import jax
  _check_workload(workload)
  from jax._src import xla_bridge
  if xla_bridge.backends_are_initialized():
    logging.warning("backend.prepare_process after JAX's first computation: the CPU "
                    "process settings (compile options, allocator) may not apply")
  if cpu_only_host():
    jax.config.update("jax_platforms", "cpu")  # else JAX tries libtpu first and logs it
    from adaptive_vision.cpu import process
    process.prepare(workload, cpu_devices)
  elif cpu_devices:
    logging.warning("cpu_devices=%d ignored: this host has an accelerator", cpu_devices)


def setup(workload: str = "train", options=None) -> Backend:
  """`prepare_process` then `choose` (programs on one device): the one call
  for a program of one's own (see the module docstring)."""
  prepare_process(workload)
  return choose(options, None, workload)


def cpu_only_host() -> bool:
  """True when JAX could only ever run on the CPU here and the user chose no
  platform: no TPU library (the libtpu package or TPU_LIBRARY_PATH), no TPU chip
  on the PCI bus, no PJRT plugin (CUDA, ROCm, ... come as `jax_plugins`)."""
  import glob
  import importlib.metadata
  import importlib.util
  import pkgutil
  import jax
  if os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms:
    return (os.environ.get("JAX_PLATFORMS") or jax.config.jax_platforms) == "cpu"
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
