r"""The CIFAR ResNets' 3x3 convolutions alone: XLA's kernels against PyTorch's.

  python -m benchmarks.investigations.conv [--threads 2] [--batch 128] [--reps 20]
      [--out results/bench_conv_zen4.json]

For each stage's stride-1 3x3 convolution at batch 128 (32x32x16, 16x16x32,
8x8x64; NHWC, 'SAME' padding), times:

* the forward convolution compiled with XLA's default CPU options (YNNPACK
  takes convolutions, dots and reductions) and with `adaptive_vision.compiler`'s
  (convolutions left to XLA's own kernel);
* forward + backward of `models.conv.conv2d` (the 'gemm' gradients the ResNets
  train with on CPU) under each of the two;
* PyTorch eager, channels-last: forward, and forward + backward.

It tells whether a convolution's kernel or what surrounds it in the train
step is slow. Medians of `--reps` calls after one warm-up, the variants in turn.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from benchmarks.investigations import median_ms

SHAPES = ((32, 16, 16), (16, 32, 32), (8, 64, 64))  # (size, C in, C out)
_SAME = ((1, 1), (1, 1))


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m benchmarks.investigations.conv", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--reps", type=int, default=20, help="timed calls per variant")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  batch, reps = args.batch, args.reps
  import jax
  import jax.numpy as jnp
  import torch
  from adaptive_vision import compiler
  from adaptive_vision.models import conv as conv_lib
  from benchmarks import common
  common.setup_jax()
  torch.set_num_threads(args.threads)
  options = {"xla_default": compiler.XLA_DEFAULT_CPU_OPTIONS, "library": compiler.options()}

  def forward(x, w):
    return conv_lib._xla_conv(x, w, (1, 1), _SAME)

  def train(x, w, g):  # forward + both gradients, as a train step needs them
    y, vjp = jax.vjp(lambda x, w: conv_lib.conv2d(x, w, (1, 1), _SAME), x, w)
    return y, vjp(g)

  rng = np.random.default_rng(0)
  rows = []
  for size, cin, cout in SHAPES:
    x = rng.standard_normal((batch, size, size, cin)).astype(np.float32)
    w = (rng.standard_normal((3, 3, cin, cout)) / np.sqrt(9 * cin)).astype(np.float32)
    g = rng.standard_normal((batch, size, size, cout)).astype(np.float32)
    jx, jw, jg = map(jnp.asarray, (x, w, g))
    row = {"shape": f"{batch}x{size}x{size}x{cin} -> {cout}",
           "gflop_forward": 2e-9 * batch * size * size * 9 * cin * cout}
    for name, opts in options.items():
      fwd = jax.jit(forward).lower(jx, jw).compile(opts)
      step = jax.jit(train).lower(jx, jw, jg).compile(opts)
      row[f"jax_{name}_forward_ms"] = median_ms(lambda: fwd(jx, jw).block_until_ready(), reps)
      row[f"jax_{name}_train_ms"] = median_ms(lambda: jax.block_until_ready(step(jx, jw, jg)), reps)
    tx = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    tw = torch.from_numpy(w).permute(3, 2, 0, 1).contiguous()
    tg = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
      row["torch_forward_ms"] = median_ms(lambda: torch.nn.functional.conv2d(tx, tw, padding=1), reps)
    tx.requires_grad_()
    tw.requires_grad_()

    def torch_train():
      y = torch.nn.functional.conv2d(tx, tw, padding=1)
      torch.autograd.grad(y, (tx, tw), tg)
    row["torch_train_ms"] = median_ms(torch_train, reps)
    rows.append(row)

  result = {"command": " ".join(["python -m benchmarks.investigations.conv"]
                                + list(argv or sys.argv[1:])),
            "machine": common.machine_info(), "torch_threads": args.threads,
            "batch": batch, "reps": reps,
            "compiler_options": options, "rows": rows}
  print(f"{'3x3 convolution, stride 1':28s} {'forward ms: XLA default':>24s} {'library':>8s} "
        f"{'torch':>6s} | {'fwd+bwd ms: XLA default':>24s} {'library':>8s} {'torch':>6s}")
  for r in rows:
    print(f"{r['shape']:28s} {r['jax_xla_default_forward_ms']:24.2f} "
          f"{r['jax_library_forward_ms']:8.2f} {r['torch_forward_ms']:6.2f} | "
          f"{r['jax_xla_default_train_ms']:24.2f} {r['jax_library_train_ms']:8.2f} "
          f"{r['torch_train_ms']:6.2f}")
  common.write_json(result, args.out)
  return result


if __name__ == "__main__":
  main()
