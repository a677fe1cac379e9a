"""Measurements that run in a process of their own.

    python -m benchmarks.child '<json spec>'

prints one line `BENCH_RESULT {json}` (see common.run_child). Kinds:

* ``jax_train_memory``: {suite, quick, train_batch, dtype, model: 'vit'|'ravit', steps}
  peak resident memory of JAX training at the suite's batch;
* ``torch``: {spec, compile: bool} the PyTorch peer's train / inference timings;
* ``torch_memory``: {spec, steps} peak resident memory of eager PyTorch training;
* ``torch_serve``: {spec} eager PyTorch train steps on request over stdin/stdout
  (torch_vit.serve), for `benchmarks.run paired`;
* ``torch_resnet_serve``: {spec} the same for the ERDE CNNs (torch_resnet.serve),
  for `benchmarks.run cnn`.

A process per measurement keeps peaks (ru_maxrss only grows) and thread pools
(XLA's and PyTorch's OpenMP) from mixing.
"""

from __future__ import annotations

import json
import sys

from benchmarks import common


def main(argv) -> None:
  if len(argv) != 2:
    raise SystemExit("usage: python -m benchmarks.child '<json spec>'")
  spec = json.loads(argv[1])
  kind = spec.get("kind")
  if kind == "jax_train_memory":
    common.setup_jax()
    from benchmarks import jax_bench, suites
    suite = suites.get(spec["suite"], quick=spec["quick"], train_batch=spec.get("train_batch"),
                       dtype=spec.get("dtype"))
    config = suite.vit if spec["model"] == "vit" else suite.ravit
    result = jax_bench.train_memory(config, spec["steps"])
  elif kind == "torch":
    from benchmarks import torch_vit
    t = spec["spec"]
    if t.get("device") == "gpu":
      import torch
      if not torch.cuda.is_available():
        raise SystemExit("the JAX side runs on a GPU but this torch has no CUDA; "
                         "no like-for-like peer")
    result = torch_vit.measure(t, compile=bool(spec.get("compile")))
  elif kind == "torch_serve":
    from benchmarks import torch_vit
    torch_vit.serve(spec["spec"], sys.stdin, sys.stdout)
    return
  elif kind == "torch_resnet_serve":
    from benchmarks import torch_resnet
    torch_resnet.serve(spec["spec"], sys.stdin, sys.stdout)
    return
  elif kind == "torch_memory":
    from benchmarks import torch_vit
    result = torch_vit.train_memory(spec["spec"], spec["steps"])
  else:
    raise SystemExit(f"unknown child kind {kind!r}")
  common.emit_result(result)


if __name__ == "__main__":
  main(sys.argv)
