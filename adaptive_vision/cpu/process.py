"""Process settings for the CPU backend, applied before JAX's first computation.

`prepare(workload, cpu_devices)`:

* glibc keeps freed memory for reuse (host_memory.py: the ERDE teacher step
  1.27x faster, paired);
* XLA_FLAGS gets the workload's compile options (compiler.py), so programs
  compiled with plain `jax.jit` get them too;
* the PRNG is 'rbg': deterministic like threefry but far cheaper for XLA:CPU
  to compile (a jitted ResNet init: ~15 s instead of ~80 s here);
* 'serve' (a process that waits for each answer before its next call, as
  launch.predict does): programs run on the calling thread instead of a
  dispatch thread, which at batch 1 is a large share of a call;
* `cpu_devices` > 0 splits the host into that many XLA devices: XLA:CPU
  spreads one small op over the cores poorly, while independent per-device
  programs keep them busy (2 or 4 devices: the CIFAR ViT step 1.15-1.4x
  faster on 2 cores; results/bench_notes.md).
"""

from __future__ import annotations

import os

from adaptive_vision.cpu import compiler, host_memory


def prepare(workload: str = "train", cpu_devices: int = 0) -> None:
  import jax
  if cpu_devices < 0:
    raise ValueError(f"cpu_devices={cpu_devices}; give a positive count or 0 for JAX's default")
  flags = compiler.xla_flags(workload)
  current = os.environ.get("XLA_FLAGS", "")
  names = {f.split("=", 1)[0] for f in current.split()}
  extra = [f for f in flags if f.split("=", 1)[0] not in names]  # the user's own win
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current] + extra).strip()
  host_memory.keep_freed_memory()
  jax.config.update("jax_default_prng_impl", "rbg")
  if workload == "serve":
    jax.config.update("jax_cpu_enable_async_dispatch", False)
  if cpu_devices:
    jax.config.update("jax_num_cpu_devices", int(cpu_devices))
