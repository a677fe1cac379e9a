r"""Paired timing of the ERDE CNN train steps against their PyTorch eager peers.

  python -m benchmarks.run cnn [--rounds 10] [--steps 2] [--batch 128] \
      [--out results/bench_cnn.json] [--update results/bench_cpu.json]

Variants, each compiled (or started) once, then timed in alternating rounds
(order reversed every other round) so that a busy minute hits all alike:

  teacher            the ERDE teacher step (configs/erde_cifar10.py:role=teacher,
                     ResNet-20 with its two exit heads), convolutions 'auto'
                     (on one CPU device: the native C++ kernels)
  teacher_gemm_conv  the same with the 'gemm' convolutions (XLA's forward,
                     backward as matrix products); student_gemm_conv likewise
  teacher_xla_conv   the same with XLA's own convolution gradients
  teacher_native_norm  the same with BatchNorm (+ residual + ReLU) as native C++
                     kernels (models.norm 'native') instead of XLA fusions with the
                     hand-written gradient ('auto' on CPU); student_native_norm likewise
  teacher_autodiff_norm  the same with JAX's autodiff BatchNorm gradient
  teacher_ynn_conv   (CPU) teacher_gemm_conv compiled with XLA's default options,
                     which hand the convolutions to YNNPACK (adaptive_vision.compiler
                     leaves them to XLA); student_ynn_conv likewise
  teacher_glibc_malloc  (glibc; only when named in --only) the teacher step with
                     glibc's default mmap and trim settings, switched on around its
                     own steps only; the others run with
                     adaptive_vision.host_memory.keep_freed_memory. Not in the
                     default set: the variants timed after it in a round run up to
                     1.5x slower (results/bench_notes.md), which biased the others
  teacher_torch      the same network and SGD step in eager PyTorch (child process)
  student            the ERDE student step: ResNet-8 + the frozen teacher's
                     forward pass, ERDE loss, as the distillation trainer runs it
  student_torch      its PyTorch eager peer
  teacher_devicesN   (with --cpu-devices N) the teacher step with its batch
                     sharded over N host CPU devices (launch.train --cpu_devices)

Figures of merit: the median over rounds of paired ratios (peer time / ours),
with quartiles. `--update` writes `resnet_train_speedup_vs_torch_eager` (the
teacher step) and `erde_student_train_images_per_s` into an existing
results JSON, with the machine (CPU model and flags).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from benchmarks import common


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.run cnn", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rounds", type=int, default=10)
  p.add_argument("--steps", type=int, default=2, help="steps per variant per round")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--no-torch", action="store_true", help="JAX variants only")
  p.add_argument("--cpu-devices", type=int, default=0,
                 help="also time the teacher sharded over this many host CPU devices")
  p.add_argument("--quick", action="store_true", help="width 0.25 nets (smoke test)")
  p.add_argument("--only", default=None,
                 help="comma-separated variants to time (default: all); fewer variants "
                      "make shorter rounds, so more of them fit in a quiet spell")
  p.add_argument("--out", default=None, help="JSON with every variant's timings")
  p.add_argument("--update", default=None,
                 help="existing results JSON to receive the two headline fields")
  return p.parse_args(argv)


def _configs(batch: int, quick: bool, conv: str, norm: str = "auto"):
  from configs import erde_cifar10
  teacher = erde_cifar10.get_config("role=teacher")
  # The student step with the teacher's forward inside it: the first student of
  # a seed runs this; the others read the teacher's logits from the cache.
  student = erde_cifar10.get_config("loss=erde,teacher_cache=")
  for c in (teacher, student):
    c.batch_size = batch
    c.mesh.data = 1  # one device unless a variant shards it
    c.data.source = "synthetic"
    for m in [c.model] + ([c.teacher.model] if c.get("teacher") else []):
      m.conv = conv
      m.norm = norm
      if quick:
        m.width_multiplier = 0.25
  return teacher, student


def _jax_step(config, compiler_options=None):
  """A compiled train step built as the trainer builds it (teacher included);
  `compiler_options` replace the library's (adaptive_vision.compiler)."""
  import jax
  from adaptive_vision import models
  from adaptive_vision import sharding as shd
  from adaptive_vision.train import build
  from benchmarks import jax_bench
  rng = jax.random.PRNGKey(0)
  t_vars = None
  if config.get("teacher"):  # a random teacher of the right shapes: its values cost nothing
    t_vars = models.build(config.teacher.model).init(
        {"params": rng, "dropout": rng}, models.dummy_inputs(config.teacher.model), train=False)
  trainer = build.build(config, total_steps=10_000, teacher_variables=t_vars)
  state, t_vars = trainer.init_state(rng), trainer.teacher_variables
  batch = shd.global_batch(jax_bench.synthetic_batch(config, config.batch_size), trainer.mesh)
  lowered = trainer.train_step.lower(state, batch, t_vars)
  compiled = lowered.compile(compiler_options) if compiler_options else lowered.compile()
  params = sum(int(np.prod(p.shape)) for p in jax.tree_util.tree_leaves(state.params))
  return [compiled, state, batch, t_vars, params]


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.cpu_devices > 1:
    common.add_xla_flags(common.cpu_devices_flag(args.cpu_devices))
  import jax
  common.setup_jax()
  from adaptive_vision import compiler, host_memory
  from benchmarks import torch_resnet
  from benchmarks.paired import _TorchPeer

  only = set(args.only.split(",")) if args.only else None
  if only:
    known = {"teacher", "student", "teacher_gemm_conv", "student_gemm_conv", "teacher_xla_conv",
             "teacher_native_norm", "student_native_norm", "teacher_autodiff_norm",
             "teacher_ynn_conv", "student_ynn_conv", "teacher_glibc_malloc", "teacher_torch",
             "student_torch", f"teacher_devices{args.cpu_devices}"}
    if only - known:
      raise SystemExit(f"--only: unknown variants {sorted(only - known)}; known: {sorted(known)}")
    for peer in ("teacher_torch", "student_torch"):
      if peer in only and peer.replace("_torch", "") not in only:
        raise SystemExit(f"--only: {peer} is timed against {peer.replace('_torch', '')}; add it")
  wanted = lambda name: only is None or name in only
  built, peers = {}, {}
  for conv, norm in (("auto", "auto"), ("gemm", "auto"), ("xla", "auto"), ("auto", "native"),
                     ("auto", "autodiff")):
    teacher_cfg, student_cfg = _configs(args.batch, args.quick, conv, norm)
    if norm == "native":
      from adaptive_vision.native import norm as native_norm
      if not native_norm.available():  # no C++ compiler, or not the CPU
        continue
      names = [("teacher_native_norm", teacher_cfg), ("student_native_norm", student_cfg)]
    elif norm != "auto":
      names = [("teacher_autodiff_norm", teacher_cfg)]
    elif conv == "auto":
      names = [("teacher", teacher_cfg), ("student", student_cfg)]
    elif conv == "gemm":
      names = [("teacher_gemm_conv", teacher_cfg), ("student_gemm_conv", student_cfg)]
      if jax.default_backend() == "cpu":
        names += [("teacher_ynn_conv", teacher_cfg), ("student_ynn_conv", student_cfg)]
    else:
      names = [("teacher_xla_conv", teacher_cfg)]
    if (conv, norm) == ("auto", "auto") and args.cpu_devices > 1:
      sharded = _configs(args.batch, args.quick, conv)[0]
      sharded.mesh.data = args.cpu_devices
      names.append((f"teacher_devices{args.cpu_devices}", sharded))
    if (conv, norm) == ("auto", "auto") and host_memory.keep_freed_memory() and only:
      names.append(("teacher_glibc_malloc", teacher_cfg))
    for name, cfg in names:
      if not wanted(name):
        continue
      start = time.perf_counter()
      options = compiler.XLA_DEFAULT_CPU_OPTIONS if name.endswith("_ynn_conv") else None
      built[name] = _jax_step(cfg, options)
      common.log(f"{name}: compiled in {time.perf_counter() - start:.1f} s")
  if not args.no_torch:
    teacher_cfg, student_cfg = _configs(args.batch, args.quick, "auto")
    for name, cfg in (("teacher_torch", teacher_cfg), ("student_torch", student_cfg)):
      if not wanted(name):
        continue
      spec = torch_resnet.spec_from_config(cfg, args.batch)
      own = built[name.replace("_torch", "")][4]
      if torch_resnet.parameter_count(spec["model"]) != own:
        raise SystemExit(f"{name}: torch peer has {torch_resnet.parameter_count(spec['model'])} "
                         f"parameters, the JAX model {own}: not the same network")
      peers[name] = _TorchPeer(spec, kind="torch_resnet_serve")

  def steps(name: str, n: int) -> float:
    compiled, state, batch, t_vars, _ = built[name]
    start = time.perf_counter()
    for _ in range(n):
      state, metrics = compiled(state, batch, t_vars)
    jax.block_until_ready((state, metrics))
    built[name][1] = state
    return (time.perf_counter() - start) / max(n, 1)

  def run(name: str) -> float:
    if name in peers:
      return peers[name](args.steps) / args.steps
    if name == "teacher_glibc_malloc":
      return common.with_glibc_malloc_defaults(lambda n: steps(name, n), args.steps)
    return steps(name, args.steps)

  order = list(built) + list(peers)
  try:
    times = common.interleaved_rounds(order, run, args.rounds)
  finally:
    for peer in peers.values():
      peer.close()

  def paired(num: str, den: str) -> dict:
    ratio = np.asarray(times[num]) / np.asarray(times[den])
    return {"median": float(np.median(ratio)),
            "quartiles": [float(np.percentile(ratio, 25)), float(np.percentile(ratio, 75))]}

  rows = {n: {"median_step_s": float(np.median(t)),
              "images_per_s": float(args.batch / np.median(t)), "step_times_s": t}
          for n, t in times.items()}
  # (figure, peer, ours): the peer's time over ours, where both were timed.
  pairs = [("teacher_vs_teacher_gemm_conv", "teacher_gemm_conv", "teacher"),
           ("student_vs_student_gemm_conv", "student_gemm_conv", "student"),
           ("teacher_vs_teacher_xla_conv", "teacher_xla_conv", "teacher"),
           ("teacher_vs_teacher_autodiff_norm", "teacher_autodiff_norm", "teacher"),
           ("teacher_native_norm_vs_teacher", "teacher", "teacher_native_norm"),
           ("student_native_norm_vs_student", "student", "student_native_norm"),
           ("teacher_vs_teacher_glibc_malloc", "teacher_glibc_malloc", "teacher"),
           ("teacher_gemm_conv_vs_teacher_ynn_conv", "teacher_ynn_conv", "teacher_gemm_conv"),
           ("student_gemm_conv_vs_student_ynn_conv", "student_ynn_conv", "student_gemm_conv"),
           ("teacher_vs_torch_eager", "teacher_torch", "teacher"),
           ("teacher_native_norm_vs_torch_eager", "teacher_torch", "teacher_native_norm"),
           ("teacher_xla_conv_vs_torch_eager", "teacher_torch", "teacher_xla_conv"),
           ("student_vs_torch_eager", "student_torch", "student"),
           ("student_native_norm_vs_torch_eager", "student_torch", "student_native_norm")]
  if args.cpu_devices > 1:
    sharded = f"teacher_devices{args.cpu_devices}"
    pairs += [(f"{sharded}_vs_teacher", "teacher", sharded),
              (f"{sharded}_vs_torch_eager", "teacher_torch", sharded)]
  ratios = {figure: paired(peer, ours) for figure, peer, ours in pairs
            if peer in times and ours in times}
  result = {"command": " ".join(["python -m benchmarks.run cnn"] + list(argv or sys.argv[1:])),
            "batch": args.batch, "rounds": args.rounds, "steps_per_round": args.steps,
            "quick": args.quick, "machine": common.machine_info(),
            "variants": rows, "paired_speedups": ratios}
  print(f"\n{'variant':18s} {'img/s':>8s}")
  for name, v in rows.items():
    print(f"{name:18s} {v['images_per_s']:8.1f}")
  for name, v in ratios.items():
    q1, q3 = v["quartiles"]
    print(f"{name:32s} {v['median']:.3f}x [{q1:.2f}, {q3:.2f}]")
  common.write_json(result, args.out)
  if args.update:
    from benchmarks import report
    with open(args.update) as f:
      target = json.load(f)
    target["cnn"] = {"command": result["command"], "machine": result["machine"],
                     "quick": result["quick"],
                     "images_per_s": {n: v["images_per_s"] for n, v in rows.items()},
                     "paired_speedups": ratios}
    if "teacher_vs_torch_eager" in ratios:
      target["resnet_train_speedup_vs_torch_eager"] = ratios["teacher_vs_torch_eager"]["median"]
    if "student" in rows:
      target["erde_student_train_images_per_s"] = rows["student"]["images_per_s"]
    report.rewrite(args.update, target)
  return result

