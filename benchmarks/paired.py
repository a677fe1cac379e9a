r"""Paired, interleaved timing of train-step variants in one process.

  python -m benchmarks.run paired [--only default,no_ynn,...] [--model vit|ravit]
      [--rounds 12] [--steps 3] [--quick] [--out results/bench_paired.json]

On a shared machine the speed drifts by +-25% between minutes, so comparing
separate runs (one process per variant) cannot resolve 10% effects. Here every
variant is compiled in the same process, then the variants take turns, a few
steps each, for `--rounds` rounds (the order reversed every other round);
the figure of merit is the median over rounds of the paired ratio
(time of `default` in that round / time of the variant in that round).

A variant is a combination of: XLA compiler options (per compile, through
`jax.jit(...).lower(...).compile(options)`), the attention implementation, and
the number of CPU devices the batch is sharded over (the process starts with
`--max-devices` CPU devices; a variant's mesh uses the first ones).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from adaptive_vision import compiler  # imports jax only when called
from benchmarks import common  # no jax import: XLA_FLAGS can still be set

NO_YNN = {compiler.YNN_FUSION_TYPE: ""}
# YNNPACK for dots only: no YNN reductions, whose operands XLA materializes as
# full-size broadcasts (112 `wrapped_broadcast` copies in the ViT step, 15 without).
YNN_DOTS = {compiler.YNN_FUSION_TYPE: "LIBRARY_FUSION_TYPE_DOT"}
# name -> (compiler options, attention implementation or None, devices, what)
VARIANTS = {
    "default": ({}, None, 1, "the configs as they are (attention 'auto' = 'xla' on CPU), "
                "compiled with adaptive_vision.compiler's options"),
    "glibc_malloc": ({}, None, 1, "glibc's default mmap/trim settings around this variant's "
                     "steps (the others keep freed memory: adaptive_vision.host_memory)"),
    "ynn_conv": (compiler.XLA_DEFAULT_CPU_OPTIONS, None, 1,
                 "XLA's default CPU options: YNNPACK also runs the convolutions"),
    "attention_fused": ({}, "fused", 1, "jax.nn.dot_product_attention (previous default)"),
    "no_ynn": (NO_YNN, None, 1, "no YNNPACK fusions: XLA's own dot/elementwise code"),
    "fast_math": ({"xla_cpu_enable_fast_math": True}, None, 1, "fast-math approximations"),
    "concurrency_scheduler": ({"xla_cpu_enable_concurrency_optimized_scheduler": True}, None,
                              1, "scheduler that maximizes concurrent ops"),
    "devices2": ({}, None, 2, "batch sharded over 2 CPU devices"),
    "devices4": ({}, None, 4, "batch sharded over 4 CPU devices"),
    "devices8": ({}, None, 8, "batch sharded over 8 CPU devices"),
    "ynn_dots_only": (YNN_DOTS, None, 1, "YNNPACK fusions around dots only (no YNN reductions)"),
    "devices4_ynn_dots_only": (YNN_DOTS, None, 4, "4 CPU devices, YNNPACK fusions around dots only"),
    "devices4_no_ynn": (NO_YNN, None, 4, "4 CPU devices, no YNNPACK fusions"),
    "devices2_one_thread_ops": ({"xla_cpu_multi_thread_eigen": False}, None, 2,
                                "2 CPU devices, each op on one thread (no intra-op split)"),
}


TORCH_VARIANT = (None, "torch SDPA", None, "the PyTorch eager peer (benchmarks/torch_vit.py), "
                 "same model, batch and optimizer, all cores")


class _TorchPeer:
  """The PyTorch eager peer in a child process, running train steps on request."""

  def __init__(self, spec: dict, kind: str = "torch_serve"):
    import subprocess
    self.proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.child", json.dumps({"kind": kind, "spec": spec})],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=common.REPO_ROOT,
        env=common.child_env(drop=("XLA_FLAGS",)))
    self._expect("TORCH_READY")
    common.log("torch eager peer ready")

  def _expect(self, tag: str) -> str:
    for line in self.proc.stdout:
      if line.startswith(tag):
        return line[len(tag):].strip()
    raise RuntimeError(f"the torch peer exited (code {self.proc.wait()}) before {tag}")

  def __call__(self, steps: int) -> float:
    self.proc.stdin.write(f"{steps}\n")
    self.proc.stdin.flush()
    return float(self._expect("TORCH_SECONDS"))

  def close(self):
    try:
      self.proc.stdin.write("quit\n")
      self.proc.stdin.close()
      self.proc.wait(timeout=30)
    except Exception:  # already gone
      self.proc.kill()


def _start_torch_peer(suite):
  from benchmarks import torch_vit
  return _TorchPeer(torch_vit.spec_from_config(suite.vit, suite))


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.run paired", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
  p.add_argument("--model", default="vit", choices=("vit", "ravit"))
  p.add_argument("--rounds", type=int, default=12)
  p.add_argument("--steps", type=int, default=3, help="train steps per variant per round")
  p.add_argument("--max-devices", type=int, default=4)
  p.add_argument("--quick", action="store_true", help="the tiny --quick models")
  p.add_argument("--torch-eager", action="store_true",
                 help="also time the PyTorch eager peer of the ViT in the same rounds (a "
                      "child process that runs its steps while this one waits)")
  p.add_argument("--out", default=None, help="write the result as JSON here")
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  names = [n.strip() for n in (args.only or ",".join(VARIANTS)).split(",") if n.strip()]
  unknown = set(names) - set(VARIANTS)
  if unknown:
    raise SystemExit(f"unknown variants {sorted(unknown)}; valid: {sorted(VARIANTS)}")
  if "default" in names:
    names.remove("default")
  names.insert(0, "default")
  if max(VARIANTS[n][2] for n in names) > args.max_devices:
    raise SystemExit("a variant needs more devices than --max-devices")
  common.add_xla_flags(common.cpu_devices_flag(args.max_devices))
  import jax
  from benchmarks import jax_bench, suites
  common.setup_jax()
  if jax.default_backend() != "cpu":
    raise SystemExit("benchmarks.run paired compares CPU variants; run the suite elsewhere")
  if args.torch_eager and args.model != "vit":
    raise SystemExit("--torch-eager: the PyTorch peer is the ViT; use --model vit")

  built = {}
  for name in names:
    options, attention, devices, _ = VARIANTS[name]
    suite = suites.get("cifar", quick=args.quick, attention=attention)
    config = suite.vit if args.model == "vit" else suite.ravit
    config.mesh.data = devices
    start = time.perf_counter()
    _, state, step, batch, _, _ = jax_bench.build_train(config)
    compiled = step.lower(state, batch, None).compile(options or None)
    built[name] = [compiled, state, batch]
    common.log(f"{name}: compiled in {time.perf_counter() - start:.1f} s")

  peer = _start_torch_peer(suites.get("cifar", quick=args.quick)) if args.torch_eager else None

  def run_variant(name: str) -> float:
    if name == "torch_eager":
      return peer(args.steps) / args.steps
    if name == "glibc_malloc":
      from adaptive_vision import host_memory
      if host_memory.keep_freed_memory():
        return common.with_glibc_malloc_defaults(lambda n: steps(name, n), args.steps)
    return steps(name, args.steps)

  def steps(name: str, n: int) -> float:
    compiled, state, batch = built[name]
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = compiled(state, batch, None)
    jax.block_until_ready((state, metrics))
    built[name][1] = state
    return (time.perf_counter() - start) / max(n, 1)

  order = names + (["torch_eager"] if peer else [])
  try:
    times = common.interleaved_rounds(order, run_variant, args.rounds)
  finally:
    if peer:
      peer.close()

  batch_size = built["default"][2]["label"].shape[0]
  base = np.asarray(times["default"])
  rows = {}
  for name in order:
    t = np.asarray(times[name])
    ratio = base / t
    options, attention, devices, what = VARIANTS.get(name, TORCH_VARIANT)
    rows[name] = {
        "what": what, "compiler_options": options, "attention": attention or "config",
        "devices": devices, "median_step_s": float(np.median(t)),
        "images_per_s": float(batch_size / np.median(t)),
        "speedup_median": float(np.median(ratio)),
        "speedup_quartiles": [float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75))],
        "step_times_s": t.tolist(),
    }
    if "torch_eager" in times:  # paired: this variant's images/s over the peer's
      rows[name]["speedup_vs_torch_eager"] = float(np.median(np.asarray(times["torch_eager"]) / t))
  result = {"command": " ".join(["python -m benchmarks.run paired"] + list(argv or sys.argv[1:])),
            "model": args.model, "batch": int(batch_size), "rounds": args.rounds,
            "steps_per_round": args.steps, "machine": common.machine_info(),
            "variants": rows}
  print(f"\n{'variant':24s} {'img/s':>7s} {'speed-up vs default (median, IQR)':>36s}")
  for name, v in rows.items():
    q1, q3 = v["speedup_quartiles"]
    print(f"{name:24s} {v['images_per_s']:7.1f} {v['speedup_median']:10.3f}x "
          f"[{q1:.2f}, {q3:.2f}]  {v['what']}")
  if "torch_eager" in rows:
    print("\npaired images/s over PyTorch eager's (median of rounds): " + ", ".join(
        f"{n} {v['speedup_vs_torch_eager']:.3f}x" for n, v in rows.items() if n != "torch_eager"))
  common.write_json(result, args.out)
  return result

