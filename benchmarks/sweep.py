r"""Candidate speed-ups of the train step, each measured in its own process.

  python -m benchmarks.sweep [--only baseline,vec512,...] [--models vit] [--quick]
      [--out-dir results/bench_sweep]

Runs `python -m benchmarks.run --stages train` once per variant (XLA flags
and/or benchmark options; the baseline also measures the peak) and writes
`<out-dir>/<variant>.json` plus a summary table `<out-dir>.md`: images/s,
speed-up over the baseline and fraction of the baseline's fp32 peak. About a
minute per variant on 2 idle cores (compile included). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from benchmarks import common

# name -> (extra XLA_FLAGS, extra benchmarks.run arguments, what it tests)
VARIANTS = {
    "baseline": ("", [], "the defaults"),
    "batch64": ("", ["--train-batch", "64"], "smaller batch"),
    "batch256": ("", ["--train-batch", "256"], "larger batch (bigger matmuls)"),
    "bf16": ("", ["--dtype", "bfloat16"], "bf16 compute (no native bf16 on this CPU)"),
    "vec512": ("--xla_cpu_prefer_vector_width=512", [], "AVX-512 vectors in XLA's own loops"),
    "fast_math": ("--xla_cpu_enable_fast_math=true", [], "fast math (tanh/exp approximations)"),
    "onednn": ("--xla_cpu_use_onednn=true", [], "oneDNN for dots"),
    "xnnpack": ("--xla_cpu_use_xnnpack=true", [], "XNNPACK for dots"),
    "no_ynn_fusion": ("--xla_cpu_experimental_ynn_fusion_type=", [],
                      "no YNNPACK fusions (XLA's own dot emitter)"),
    "legacy_runtime": ("--xla_cpu_use_thunk_runtime=false", [], "pre-thunk CPU runtime"),
    "concurrency_scheduler": ("--xla_cpu_enable_concurrency_optimized_scheduler=true", [],
                              "scheduler that overlaps independent ops"),
    "single_thread_eigen": ("--xla_cpu_multi_thread_eigen=false", [],
                            "no intra-op threading (lower bound / overhead check)"),
    "attention_fused": ("", ["--attention", "fused"],
                        "jax.nn.dot_product_attention (the default before the 'xla' layout)"),
    "cpu_devices2": ("", ["--cpu-devices", "2"], "host split into 2 devices, batch sharded"),
    "cpu_devices4": ("", ["--cpu-devices", "4"], "host split into 4 devices, batch sharded"),
    "cpu_devices4_no_ynn": ("--xla_cpu_experimental_ynn_fusion_type=", ["--cpu-devices", "4"],
                            "4 devices and no YNNPACK fusions (the fastest found)"),
}


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.sweep", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(VARIANTS)}")
  p.add_argument("--models", default="vit", help="train steps to time: vit, ravit or vit,ravit")
  p.add_argument("--quick", action="store_true")
  p.add_argument("--out-dir", default=None)
  args = p.parse_args(argv)
  names = [n.strip() for n in (args.only or ",".join(VARIANTS)).split(",") if n.strip()]
  unknown = set(names) - set(VARIANTS)
  if unknown:
    raise SystemExit(f"unknown variants {sorted(unknown)}; valid: {sorted(VARIANTS)}")
  if "baseline" not in names:
    names.insert(0, "baseline")
  out_dir = args.out_dir or ("results/bench_sweep" + ("_quick" if args.quick else ""))
  os.makedirs(out_dir, exist_ok=True)
  rows = {}
  for name in names:
    flags, extra, _ = VARIANTS[name]
    env = common.child_env()
    common.add_xla_flags(flags, env=env)
    out = os.path.join(out_dir, f"{name}.json")
    stages = "peak,train" if name == "baseline" else "train"
    cmd = [sys.executable, "-m", "benchmarks.run", "--stages", stages, "--train-models",
           args.models, "--out", out] + extra + (["--quick"] if args.quick else [])
    start = time.perf_counter()
    print(f"[sweep] {name}: XLA_FLAGS='{env['XLA_FLAGS']}' {' '.join(extra)}", flush=True)
    proc = subprocess.run(cmd, env=env, cwd=common.REPO_ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
      rows[name] = {"error": (proc.stderr or proc.stdout).strip().splitlines()[-1:]}
      print(f"[sweep] {name} failed: {rows[name]['error']}", flush=True)
      continue
    with open(out) as f:
      rows[name] = json.load(f)
    print(f"[sweep] {name} done in {time.perf_counter() - start:.0f} s", flush=True)
  write_summary(rows, out_dir + ".md", args.models.split(","))


def write_summary(rows: dict, path: str, models) -> None:
  base = rows.get("baseline", {})
  peak = (base.get("peak") or {}).get("float32", {}).get("peak_flops_per_s")
  lines = ["# Train-step variants (python -m benchmarks.sweep)", ""]
  m = base.get("machine") or {}
  lines.append(f"Machine: {m.get('cpu_model')}, {m.get('cpu_count')} cores; jax {m.get('jax')}; "
               f"load average at the baseline's start {m.get('load_average_at_start')}. "
               f"Baseline fp32 peak: {peak / 1e9:.1f} GFLOP/s." if peak else "")
  lines += ["", "| variant | what | model | batch | images/s | vs baseline | GFLOP/s (XLA) | "
            "fraction of baseline peak | compile (s) |", "|---|---|---|---|---|---|---|---|---|"]
  for name, r in rows.items():
    what = VARIANTS[name][2]
    if "error" in r:
      lines.append(f"| {name} | {what} | | | failed: {r['error']} | | | | |")
      continue
    for model in models:
      t = (r.get("train") or {}).get(model)
      b = ((base.get("train") or {}).get(model) or {}).get("images_per_s")
      if not t:
        continue
      rel = t["images_per_s"] / b if b else None
      frac = t["flops_per_s"] / peak if peak and t.get("flops_per_s") else None
      lines.append(f"| {name} | {what} | {model} | {t['batch']} | {t['images_per_s']:.1f} | "
                   f"{'' if rel is None else f'{rel:.2f}x'} | "
                   f"{(t.get('flops_per_s') or 0) / 1e9:.1f} | "
                   f"{'' if frac is None else f'{100 * frac:.1f}%'} | "
                   f"{t['first_step_compile_s']:.1f} |")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  print(f"[sweep] wrote {path}")


if __name__ == "__main__":
  main()
