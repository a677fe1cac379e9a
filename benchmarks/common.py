"""Machine description, timing helpers, progress lines and child processes.

Importing this module does not import jax or torch.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Optional, Sequence

from adaptive_vision import machine

RESULT_TAG = "BENCH_RESULT "
_START = time.perf_counter()


def setup_jax(**kwargs) -> None:
  """The JAX settings of the launchers (launch.common.setup: partitionable
  threefry, rbg default PRNG; `kwargs` are its options), so the benchmark
  compiles what training compiles."""
  from launch import common as launch_common
  launch_common.setup(**kwargs)


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def with_glibc_malloc_defaults(steps: Callable[[int], float], n: int) -> float:
  """`steps(n)` (seconds per step) timed with glibc's default mmap and trim
  settings instead of adaptive_vision.host_memory.keep_freed_memory, which
  the rest of the process keeps: the allocator side of a paired comparison.
  One untimed step after each switch, so both sides are timed warm."""
  from adaptive_vision import host_memory
  host_memory.glibc_defaults()
  try:
    steps(1)
    return steps(n)
  finally:
    host_memory.keep_freed_memory()
    steps(1)


def get_path(d, *keys):
  """d[k0][k1]... or None where a level is missing, None or not a dict."""
  for k in keys:
    if not isinstance(d, dict) or d.get(k) is None:
      return None
    d = d[k]
  return d


def add_xla_flags(*flags: str, env: Optional[dict] = None) -> None:
  """Appends flags to XLA_FLAGS of `env` (default: this process, before jax starts
  its backend; child processes inherit it)."""
  env = os.environ if env is None else env
  env["XLA_FLAGS"] = " ".join([env.get("XLA_FLAGS", "")] + [f for f in flags if f]).strip()


def cpu_devices_flag(n: int) -> str:
  """The XLA flag that splits the CPU host into n devices."""
  return f"--xla_force_host_platform_device_count={int(n)}"


def child_env(drop: Sequence[str] = (), **extra: str) -> dict:
  """This process's environment for a child run from the repository root: the
  repository first on PYTHONPATH, `drop` removed, `extra` set."""
  env = {k: v for k, v in os.environ.items() if k not in drop}
  env.update(extra)
  env["PYTHONPATH"] = os.pathsep.join(
      [REPO_ROOT] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  return env


def log(message: str) -> None:
  """A progress line: seconds since the benchmark started, then the message."""
  print(f"[bench {time.perf_counter() - _START:7.1f}s] {message}", flush=True)


def native_bf16_cpu() -> bool:
  """Whether the CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16)."""
  flags = machine.cpu_flags()
  return bool({"avx512_bf16", "amx_bf16"} & flags)


def package_version(name: str) -> Optional[str]:
  try:
    from importlib import metadata
    return metadata.version(name)
  except Exception:  # not installed
    return None


def machine_info() -> dict[str, Any]:
  """What the figures were measured on (jax is imported here)."""
  import jax
  devices = jax.devices()
  flags = machine.cpu_flags()
  info = {
      "cpu_model": machine.cpu_model(),
      "cpu_family": machine.cpu_family(),
      "cpu_vector_extension": machine.vector_extension(flags),
      "cpu_count": os.cpu_count(),
      "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "cpu_simd": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
      "native_bf16_cpu": native_bf16_cpu(),
      "memory_gib": _total_memory_gib(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": package_version("jaxlib"),
      "flax": package_version("flax"),
      "optax": package_version("optax"),
      "torch": package_version("torch"),
      "backend": jax.default_backend(),
      "device_kind": devices[0].device_kind,
      "device_count": len(devices),
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average_at_start": _loadavg(),
  }
  return info


def _total_memory_gib() -> Optional[float]:
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return round(int(line.split()[1]) / 2 ** 20, 1)
  except OSError:
    pass
  return None


def _loadavg() -> Optional[list[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def summarize(times: Sequence[float]) -> dict[str, Any]:
  times = [float(t) for t in times]
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "reps": len(times), "times_s": times}


def repeat(fn: Callable[[], Any], *, reps: int, warmup: int = 1) -> dict[str, Any]:
  """Wall-clock seconds of `fn()` (which must block until its work is done):
  `warmup` untimed calls, then `reps` timed ones; returns `summarize(...)`."""
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(max(1, reps)):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return summarize(times)


def _proc_status_kib(field: str) -> Optional[int]:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1])
  except (OSError, ValueError, IndexError):
    pass
  return None


def peak_rss_bytes() -> dict[str, Optional[int]]:
  """Peak resident memory of this process so far, and its RSS now.

  Linux: VmHWM of /proc/self/status, the high-water mark of this process's own
  address space. Not ru_maxrss: after fork + exec, ru_maxrss starts from the
  parent's RSS at the fork, so a child of a large process reports the
  parent's peak. Elsewhere ru_maxrss (kilobytes on Linux, bytes on macOS).
  """
  hwm, rss = _proc_status_kib("VmHWM"), _proc_status_kib("VmRSS")
  maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  maxrss = maxrss if sys.platform == "darwin" else maxrss * 1024
  now = rss * 1024 if rss is not None else None
  if now is None:
    try:
      import psutil
      now = int(psutil.Process().memory_info().rss)
    except ImportError:
      pass
  return {"peak_rss_bytes": int(hwm * 1024 if hwm is not None else maxrss),
          "rss_now_bytes": now, "source": "VmHWM" if hwm is not None else "ru_maxrss",
          "ru_maxrss_bytes": int(maxrss)}


def write_json(result: dict, path: Optional[str]) -> None:
  """Writes a benchmark's result to `path` (creating its folder); no-op without a path."""
  if not path:
    return
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    json.dump(result, f, indent=1, default=_json_default)


def emit_result(result: dict) -> None:
  """How a child process hands its result to the parent (one tagged JSON line)."""
  print(RESULT_TAG + json.dumps(result, allow_nan=False, default=_json_default), flush=True)


def _json_default(x):
  try:
    return float(x)
  except (TypeError, ValueError):
    return str(x)


def run_child(spec: dict, *, timeout: float, env: Optional[dict] = None) -> dict:
  """Runs `python -m benchmarks.child` with `spec`; returns its result dict.

  Never raises for a failure of the child: returns {'error': reason} instead
  (non-zero exit, timeout, or no result line), so one broken measurement
  leaves the rest of the benchmark standing.
  """
  cmd = [sys.executable, "-m", "benchmarks.child", json.dumps(spec)]
  start = time.perf_counter()
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=child_env(**(env or {})), cwd=REPO_ROOT)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s", "wall_s": time.perf_counter() - start}
  result = None
  for line in proc.stdout.splitlines():
    if line.startswith(RESULT_TAG):
      result = json.loads(line[len(RESULT_TAG):])
  if proc.returncode != 0 or result is None:
    tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-6:]
    return {"error": f"child exited with code {proc.returncode}: " + " | ".join(tail)[-800:],
            "wall_s": time.perf_counter() - start}
  result.setdefault("wall_s", time.perf_counter() - start)
  return result


def interleaved_rounds(order: Sequence[str], run: Callable[[str], float], rounds: int) -> dict:
  """Times every variant in `order` once per round, the order reversed every
  other round so that a busy minute hits all alike; round 0 only warms up.
  Returns {name: [seconds per round]}."""
  times = {n: [] for n in order}
  for r in range(rounds + 1):
    for name in (order if r % 2 == 0 else list(order)[::-1]):
      t = run(name)
      if r:
        times[name].append(t)
    if r:
      log(f"round {r}/{rounds}")
  return times


def serve_steps(step: Callable[[], Any], finish: Callable[[Any], None], stdin, stdout) -> None:
  """The torch peers' protocol (`benchmarks.run paired`, `benchmarks.run cnn`): two warm-up
  steps, `TORCH_READY`, then for each stdin line `N` runs N steps, waits for
  the last (`finish`) and prints `TORCH_SECONDS <wall seconds>`; `quit` ends."""
  for _ in range(2):
    finish(step())
  print("TORCH_READY", file=stdout, flush=True)
  for line in stdin:
    line = line.strip()
    if line == "quit" or not line:
      break
    start = time.perf_counter()
    last = None
    for _ in range(int(line)):
      last = step()
    finish(last)
    print(f"TORCH_SECONDS {time.perf_counter() - start}", file=stdout, flush=True)
