"""Paired rounds, their statistics, the machine, and measurements in child processes.

Importing this module imports neither jax nor torch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from typing import Callable, Sequence

import numpy as np

from adaptive_vision import machine as machine_lib

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_START = time.perf_counter()


def log(message: str) -> None:
  print(f"[bench {time.perf_counter() - _START:6.0f}s] {message}", file=sys.stderr, flush=True)


def machine() -> dict:
  """What the figures were measured on (jax and torch versions read from metadata)."""
  from importlib import metadata
  versions = {}
  for name in ("jax", "jaxlib", "flax", "torch"):
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      versions[name] = None
  flags = machine_lib.cpu_flags()
  return {"description": machine_lib.describe(),
          "cpu_flags": sorted(f for f in flags if f.startswith(("avx", "amx", "fma"))),
          "cores_usable": len(os.sched_getaffinity(0)),
          "load_average": [round(x, 2) for x in os.getloadavg()],
          **versions}


def rounds(order: Sequence[str], run: Callable[[str], float], n: int) -> dict:
  """Seconds of `run(name)` per round for every name, the order reversed every
  other round so that a busy minute hits all alike; round 0 only warms up."""
  times = {name: [] for name in order}
  for r in range(n + 1):
    for name in order if r % 2 == 0 else list(order)[::-1]:
      t = run(name)
      if r:
        times[name].append(t)
    log(f"round {r}/{n}" + (" (warm-up)" if not r else ""))
  return times


def speedup(times: dict, base: str, variant: str) -> dict:
  """Median over rounds of base's time / variant's time, with quartiles."""
  ratio = np.asarray(times[base]) / np.asarray(times[variant])
  return {"median": float(np.median(ratio)),
          "quartiles": [float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75))],
          "rounds": len(ratio)}


def medians(times: dict, per: float = 1.0) -> dict:
  """{name: median seconds / per} of `rounds`' result."""
  return {name: float(np.median(t)) / per for name, t in times.items()}


class Child:
  """A measurement in a process of its own: `python -m <module> '<spec>'`,
  which builds its step, prints `READY <json>` and then, for each line N on
  its stdin, runs N steps and prints `SECONDS <wall seconds>` (`serve`)."""

  def __init__(self, module: str, spec: dict):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [REPO_ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    self.name = spec.get("name", module)
    self.proc = subprocess.Popen([sys.executable, "-m", module, json.dumps(spec)], cwd=REPO_ROOT,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
    self.info = None

  def _expect(self, tag: str) -> str:
    for line in self.proc.stdout:
      if line.startswith(tag):
        return line[len(tag):].strip()
    raise RuntimeError(f"{self.name} exited (code {self.proc.wait()}) before {tag.strip()}")

  def ready(self) -> dict:
    if self.info is None:
      self.info = json.loads(self._expect("READY "))
    return self.info

  def __call__(self, steps: int) -> float:
    self.proc.stdin.write(f"{steps}\n")
    self.proc.stdin.flush()
    return float(self._expect("SECONDS "))

  def close(self) -> None:
    try:
      self.proc.stdin.close()
      self.proc.wait(timeout=60)
    except (OSError, subprocess.TimeoutExpired):
      self.proc.kill()


def serve(step: Callable[[], object], finish: Callable[[object], None], info: dict) -> None:
  """The child's side of `Child`: one untimed step, READY, then steps on request."""
  finish(step())
  print("READY " + json.dumps(info), flush=True)
  for line in sys.stdin:
    start, out = time.perf_counter(), None
    for _ in range(int(line)):
      out = step()
    finish(out)
    print(f"SECONDS {time.perf_counter() - start}", flush=True)


def serve_torch(make_step: Callable[[dict], tuple], spec: dict) -> None:
  """`serve` for a PyTorch peer: `make_step(spec)` -> (step, model); threads = usable cores."""
  import torch
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  step, model = make_step(spec)
  serve(step, lambda loss: float(loss.item()),
        {"params": sum(p.numel() for p in model.parameters()),
         "threads": torch.get_num_threads(), "torch": torch.__version__})
