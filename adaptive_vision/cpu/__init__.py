"""The CPU backend: everything that makes our programs fast on a CPU, in one place.

Nothing outside this package imports it except `adaptive_vision.backend`,
which does so only when the run's devices are CPUs; on GPU/TPU it is never
imported and the models run as plain flax.

    process.py      process settings that must precede JAX's first computation:
                    glibc's allocator (host_memory.py), XLA's compile options
                    (compiler.py), dispatch, PRNG, host devices
    compiler.py     the XLA options our programs compile with, per workload
    conv.py, norm.py  CPU implementations of the models' convolution and
                    BatchNorm (same variables as the plain layers)
    native/         C++ kernels through XLA's FFI, built for the machine on
                    first use (no compiler: the other implementations)

`choose(options, num_devices, workload, model_kind)` resolves the
implementation switches of a run (config section `backend`) once:

    conv       'native' | 'gemm' | 'xla'      ('auto': native on one device when
                                               the kernels build, else gemm)
    norm       'fused' | 'native' | 'autodiff' ('auto': fused)
    exit_head  'native' | 'xla'               ('auto': native on one device)
    decide     'native' | 'xla'               ('auto': native on one device)
    attention  'xla' | 'fused'                ('auto': xla)

'native' is chosen by 'auto' only for programs on one device: a custom call
is not split across devices, so on several host devices the XLA paths win.
"""

from __future__ import annotations

from typing import Optional

SWITCHES = {
    "conv": ("auto", "native", "gemm", "xla"),
    "norm": ("auto", "fused", "native", "autodiff"),
    "exit_head": ("auto", "native", "xla"),
    "decide": ("auto", "native", "xla"),
    "attention": ("auto", "xla", "fused"),
}


def _native_module(switch: str):
  from adaptive_vision.cpu.native import conv, decide, head, norm
  return {"conv": conv, "norm": norm, "exit_head": head, "decide": decide}[switch]


def resolve(options: Optional[dict], num_devices: int) -> dict:
  """{switch: implementation} with every 'auto' resolved (see module docstring).
  An explicit 'native' that cannot run raises ValueError saying why."""
  options = dict(options or {})
  unknown = set(options) - set(SWITCHES)
  if unknown:
    raise ValueError(f"unknown backend switches {sorted(unknown)}; valid: {sorted(SWITCHES)}")
  chosen = {}
  for switch, choices in SWITCHES.items():
    value = options.get(switch, "auto")
    if value not in choices:
      raise ValueError(f"backend.{switch}={value!r}; use one of {choices}")
    if value == "native":
      reason = _native_module(switch).unavailable_reason()
      if reason:
        raise ValueError(f"backend.{switch}='native' is unavailable: {reason}")
    if value == "auto":
      if switch == "norm":
        value = "fused"
      elif switch == "attention":
        value = "xla"
      elif num_devices == 1 and _native_module(switch).available():
        value = "native"
      else:
        value = {"conv": "gemm"}.get(switch, "xla")
    chosen[switch] = value
  return chosen


def layers(chosen: dict):
  """The `models.layers.Layers` of resolved switches."""
  import flax.linen as nn
  from adaptive_vision.models import layers as plain
  conv = {"xla": nn.Conv}
  norm = {"autodiff": plain.BatchNorm}
  if chosen["conv"] != "xla":
    from adaptive_vision.cpu import conv as cpu_conv
    conv.update(gemm=cpu_conv.GemmConv, native=cpu_conv.NativeConv)
  if chosen["norm"] != "autodiff":
    from adaptive_vision.cpu import norm as cpu_norm
    norm.update(fused=cpu_norm.FusedBatchNorm, native=cpu_norm.NativeBatchNorm)
  head = None
  if chosen["exit_head"] == "native":
    from adaptive_vision.cpu.native import head as native_head
    head = native_head.exit_head
  name = "cpu:" + ",".join(f"{k}={v}" for k, v in chosen.items() if k != "decide")
  return plain.Layers(conv=conv[chosen["conv"]], batch_norm=norm[chosen["norm"]],
                      exit_head_kernel=head, attention=chosen["attention"], name=name)


def decide(chosen: dict):
  """The exit-decision kernel of the single-dispatch cascade, or None (XLA's ops)."""
  if chosen["decide"] != "native":
    return None
  from adaptive_vision.cpu.native import decide as native_decide
  return native_decide.decide
