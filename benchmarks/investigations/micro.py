r"""The CIFAR ViT's building blocks alone, JAX against PyTorch, same process.

  python -m benchmarks.investigations.micro [--threads 2] [--out results/bench_micro.json]

Times, for the shapes of the Nano/4 ViT at batch 128 (8320 tokens of width
96, MLP 384, 3 heads of 32 over 65 tokens): every dense matmul of the forward
and backward passes, and attention forward+backward (ours in both
implementations, PyTorch's `scaled_dot_product_attention`). It separates "the
matmul library is slow" from "the compiled step around it is slow": the train
step's ops run 2-3x slower than these isolated ones (results/bench_notes.md).
Medians of 20 calls after one warm-up; JAX and PyTorch alternate per shape.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

from benchmarks.investigations import median_ms

TOKENS, WIDTH, MLP, HEADS, SEQ, BATCH = 128 * 65, 96, 384, 3, 65, 128
# (M, K, N): forward x @ W, then the backward dX = dY @ W^T and dW = X^T @ dY shapes.
MATMULS = {
    "qkv forward": (TOKENS, WIDTH, 3 * WIDTH), "mlp1 forward": (TOKENS, WIDTH, MLP),
    "mlp2 forward": (TOKENS, MLP, WIDTH), "out forward": (TOKENS, WIDTH, WIDTH),
    "qkv dX": (TOKENS, 3 * WIDTH, WIDTH), "qkv dW": (WIDTH, TOKENS, 3 * WIDTH),
    "mlp1 dW": (WIDTH, TOKENS, MLP), "mlp2 dW": (MLP, TOKENS, WIDTH),
}



def main(argv=None) -> dict:
  p = argparse.ArgumentParser(prog="python -m benchmarks.investigations.micro", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--threads", type=int, default=os.cpu_count(), help="PyTorch threads")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import torch
  from benchmarks import common
  common.setup_jax()
  torch.set_num_threads(args.threads)
  rng = np.random.default_rng(0)
  rows = []
  for name, (m, k, n) in MATMULS.items():
    a, b = (rng.standard_normal(s).astype(np.float32) for s in ((m, k), (k, n)))
    ja, jb, ta, tb = jnp.asarray(a), jnp.asarray(b), torch.from_numpy(a), torch.from_numpy(b)
    f = jax.jit(jnp.matmul)
    j_ms = median_ms(lambda: f(ja, jb).block_until_ready())
    t_ms = median_ms(lambda: ta @ tb)
    gflop = 2e-9 * m * k * n
    rows.append({"op": f"matmul {name} {m}x{k}x{n}", "jax_ms": j_ms, "torch_ms": t_ms,
                 "jax_gflops": gflop / j_ms * 1e3, "torch_gflops": gflop / t_ms * 1e3})

  # Attention core, forward + backward, on [B, H, N, d] inputs.
  d = WIDTH // HEADS
  q, k, v, g = (rng.standard_normal((BATCH, HEADS, SEQ, d)).astype(np.float32)
                for _ in range(4))
  jq, jk, jv, jg = map(jnp.asarray, (q, k, v, g))

  def xla_core(q, k, v):  # the 'xla' implementation's core (vit.Attention)
    w = jax.nn.softmax(jnp.einsum("bhqd,bhkd->bhqk", q * d ** -0.5, k), axis=-1)
    return jnp.einsum("bhqk,bhkd->bhqd", w, v)

  def fused_core(q, k, v):  # 'fused': jax.nn.dot_product_attention on [B, N, H, d]
    t = lambda x: x.transpose(0, 2, 1, 3)
    return t(jax.nn.dot_product_attention(t(q), t(k), t(v)))

  for label, core in (("attention fwd+bwd, ours 'xla'", xla_core),
                      ("attention fwd+bwd, ours 'fused'", fused_core)):
    f = jax.jit(lambda q, k, v, g, core=core: jax.vjp(core, q, k, v)[1](g))
    rows.append({"op": label, "jax_ms": median_ms(lambda: jax.block_until_ready(
        f(jq, jk, jv, jg))), "torch_ms": None})
  tq, tk, tv = (torch.from_numpy(x).requires_grad_() for x in (q, k, v))
  tg = torch.from_numpy(g)

  def torch_attention():
    y = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)
    torch.autograd.grad(y, (tq, tk, tv), tg)

  rows.append({"op": "attention fwd+bwd, torch SDPA", "jax_ms": None,
               "torch_ms": median_ms(torch_attention)})

  result = {"command": " ".join(["python -m benchmarks.investigations.micro"] + list(argv or sys.argv[1:])),
            "machine": common.machine_info(), "torch_threads": args.threads, "rows": rows}
  print(f"{'op':40s} {'jax ms':>8s} {'torch ms':>9s} {'jax GFLOP/s':>12s} {'torch GFLOP/s':>14s}")
  for r in rows:
    fmt = lambda x, f="{:8.2f}": "" if x is None else f.format(x)
    print(f"{r['op']:40s} {fmt(r['jax_ms']):>8s} {fmt(r['torch_ms'], '{:9.2f}'):>9s} "
          f"{fmt(r.get('jax_gflops'), '{:12.1f}'):>12s} "
          f"{fmt(r.get('torch_gflops'), '{:14.1f}'):>14s}")
  common.write_json(result, args.out)
  return result


if __name__ == "__main__":
  main()
