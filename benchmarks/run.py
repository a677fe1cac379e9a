r"""The benchmark, one command:

  python -m benchmarks.run [--quick] [--out results/bench_cpu.json]
      [--suite cifar|imagenet] [--ravit-workdir runs/ravit_cifar10 --vit-workdir runs/vit_cifar10]

Measures, in one run on this machine: (1) the matmul peak through JAX, (2) the
jitted train step of the ViT and RAViT configs (images/s, XLA-counted FLOP/s,
fraction of the peak, compile time), (3) the same ViT in PyTorch, eager and
torch.compile (images/s; ours over theirs), (4) inference throughput at a large
batch and latency at batch 1, for the ViT and for RAViT with real dynamic early
exits at two or three operating points (measured speedup beside the one MACs
predict), (5) peak resident memory of training, one process per measurement.

Writes the JSON (--out) and a Markdown table beside it (same name, .md), and
prints a progress line per stage. Every figure is a median of several
repetitions after warm-up, except the peak, the machine's ceiling, which is
the fastest repetition. `--quick` shrinks everything to seconds (smoke test).

Paired comparisons (variants compiled in one process, timed in alternating
rounds; each prints its own options with --help):

  python -m benchmarks.run paired [--model vit|ravit] [--only default,devices4,...]
  python -m benchmarks.run cnn [--update results/bench_cpu.json]
  python -m benchmarks.run pipeline [--model vit|ravit]
  python -m benchmarks.run loop [--update results/bench_cpu.json]      launch.train's loop vs its step
  python -m benchmarks.run latency [--update results/bench_cpu.json]   batch 1

See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from typing import Any

from benchmarks import common

STAGES = ("peak", "train", "torch", "inference", "latency", "memory")
DEFAULT_REPORT = "results/ravit_cifar10_cpu/report.json"


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--suite", default="cifar", choices=("cifar", "imagenet"),
                 help="cifar: the CPU configs (default); imagenet: ViT-S/16 and RAViT "
                      "112->160->224 in bf16, for accelerators (benchmarks/gpu.sh)")
  p.add_argument("--quick", action="store_true", help="tiny models, few reps (smoke test)")
  p.add_argument("--out", default=None,
                 help="JSON path (default results/bench_<backend>[_<suite>][_quick].json, "
                      "e.g. results/bench_cpu.json); the Markdown table goes beside it (.md)")
  p.add_argument("--stages", default=",".join(STAGES),
                 help=f"comma-separated subset of {','.join(STAGES)}")
  p.add_argument("--vit-workdir", default=None, help="trained ViT run (params for inference)")
  p.add_argument("--ravit-workdir", default=None,
                 help="trained RAViT run: with --ravit-report, inference uses its params, "
                      "its calibrated thresholds and real test images")
  p.add_argument("--ravit-report", default=DEFAULT_REPORT,
                 help="report.json of launch.evaluate with calibrated thresholds")
  p.add_argument("--erde-student-workdir", default=None,
                 help="trained ERDE student for the latency stage (with its val_logits.npz)")
  p.add_argument("--erde-teacher-workdir", default=None,
                 help="trained ERDE teacher for the latency stage")
  p.add_argument("--train-batch", type=int, default=None, help="override the train batch")
  p.add_argument("--train-models", default="vit,ravit",
                 help="which train steps the train stage times (vit, ravit or both)")
  p.add_argument("--dtype", default=None, help="compute dtype override (e.g. bfloat16)")
  p.add_argument("--attention", default=None, choices=("auto", "xla", "fused"),
                 help="attention implementation of every ViT (default: the configs', 'auto')")
  p.add_argument("--cpu-devices", type=int, default=1,
                 help="CPU only: split the host into N XLA devices and shard the train "
                      "batch over them, as `launch.train --cpu_devices=N` does; the train "
                      "stage then also times the ViT on one device, for comparison")
  p.add_argument("--reps", type=int, default=None, help="override the repetitions")
  p.add_argument("--torch-compile", default="auto", choices=("auto", "on", "off"),
                 help="torch.compile peer (auto: on, except with --quick)")
  p.add_argument("--bf16-peak", default="auto", choices=("auto", "on", "off"),
                 help="also measure the bf16 matmul peak (auto: on accelerators and on "
                      "CPUs with AVX512-BF16/AMX)")
  return p.parse_args(argv)


def _finite(x):
  """JSON-safe: numpy scalars to python, NaN/inf to None."""
  if isinstance(x, dict):
    return {str(k): _finite(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_finite(v) for v in x]
  if getattr(x, "ndim", 0) and hasattr(x, "tolist"):  # numpy / jax arrays
    return _finite(x.tolist())
  if hasattr(x, "item") and not isinstance(x, (str, bytes)):
    try:
      x = x.item()
    except (ValueError, AttributeError):
      return str(x)
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


def _ratio(a, b):
  return a / b if a is not None and b else None


class Stage:
  """Context manager: progress lines and the stage's seconds in `seconds`."""

  def __init__(self, name: str, seconds: dict):
    self.name, self.seconds = name, seconds

  @staticmethod
  def _cpu():
    import resource
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

  def __enter__(self):
    self.start = time.perf_counter()
    self.cpu = self._cpu()
    common.log(f"stage {self.name} ...")
    return self

  def __exit__(self, *exc):
    dt = time.perf_counter() - self.start
    self.seconds[self.name] = dt
    cpu = self._cpu() - self.cpu
    common.log(f"stage {self.name} done in {dt:.1f} s ({cpu:.1f} s CPU)"
               + (" (FAILED)" if exc[0] else ""))
    return False


def _inference_inputs(args, suite, notes: list) -> dict:
  """Params, views and thresholds: the trained run's when given and complete, else synthetic."""
  if not args.ravit_workdir:
    return {}
  why = None
  if suite.quick:
    why = "--quick uses tiny models that no checkpoint matches"
  elif not os.path.exists(args.ravit_report):
    why = f"{args.ravit_report} does not exist (run launch.evaluate ... --out first)"
  elif not os.path.isdir(os.path.join(args.ravit_workdir, "checkpoints")):
    why = f"{args.ravit_workdir} holds no checkpoints/"
  if why:
    notes.append(f"inference on synthetic data and random params: {why}")
    common.log(f"  {notes[-1]}")
    return {}
  from adaptive_vision import models
  from adaptive_vision.train import checkpointing
  from benchmarks import jax_bench
  ravit = models.build(suite.ravit.model)
  out = {"ravit_variables": checkpointing.restore_variables(args.ravit_workdir),
         "operating_points": jax_bench.calibrated_operating_points(
             args.ravit_report, ravit.num_exits)}
  if args.vit_workdir:
    out["vit_variables"] = checkpointing.restore_variables(args.vit_workdir)
  else:
    notes.append("ViT baseline timed with random params (no --vit-workdir; the timing "
                 "does not depend on the values)")
  views, labels = jax_bench.real_test_views(suite.ravit, suite.infer_batch)
  out.update(views=views, labels=labels)
  notes.append(f"inference on the first {suite.infer_batch} test images with the trained "
               f"params of {args.ravit_workdir} and the calibrated thresholds of "
               f"{args.ravit_report}")
  return out


# Sub-commands: `python -m benchmarks.run <name> [args]` runs benchmarks.<name>.main(args).
COMMANDS = ("paired", "cnn", "pipeline", "loop", "latency")


def main(argv=None) -> dict:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] in COMMANDS:
    import importlib
    return importlib.import_module(f"benchmarks.{argv[0]}").main(argv[1:])
  return suite_main(argv)


def suite_main(argv) -> dict:
  args = parse_args(argv)
  stages = [s.strip() for s in args.stages.split(",") if s.strip()]
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise SystemExit(f"unknown stages {sorted(unknown)}; valid: {STAGES}")
  t_start = time.perf_counter()
  quick_flag = "--xla_backend_optimization_level=0"
  if args.quick and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    # Halves XLA's compile time, which is most of a --quick run; the children
    # inherit it. Takes effect only if jax has not started its backend yet.
    common.add_xla_flags(quick_flag)

  if args.cpu_devices < 1:
    raise SystemExit(f"--cpu-devices {args.cpu_devices}: give 1 or more")
  if args.cpu_devices > 1:
    # Through XLA_FLAGS (not jax's config) so the memory children inherit it.
    common.add_xla_flags(common.cpu_devices_flag(args.cpu_devices))

  import jax
  common.setup_jax()
  from benchmarks import jax_bench, report, suites, torch_vit

  suite = suites.get(args.suite, quick=args.quick, train_batch=args.train_batch,
                     dtype=args.dtype, attention=args.attention)
  if args.reps:
    suite.reps = args.reps
  if args.torch_compile != "auto":
    suite.torch_compile = args.torch_compile == "on"
  backend = jax.default_backend()
  # cifar -> results/bench_cpu.json; imagenet -> results/bench_gpu_imagenet.json;
  # --quick never overwrites a full run's file by default.
  default_name = f"bench_{backend}" + ("" if args.suite == "cifar" else f"_{args.suite}")
  out_path = args.out or os.path.join(
      "results", default_name + ("_quick" if args.quick else "") + ".json")
  machine = common.machine_info()
  common.log(f"{args.suite}{' --quick' if args.quick else ''} on {machine['cpu_model']} "
             f"({machine['cpu_count']} cores), {backend}: {machine['device_kind']} x"
             f"{machine['device_count']}, jax {machine['jax']}, torch {machine['torch']}")
  seconds: dict[str, float] = {}
  notes = list(suite.notes)
  if args.quick:
    notes.append(f"--quick compiles with XLA_FLAGS {quick_flag} (faster compiles, slower code)")
  result: dict[str, Any] = {
      "schema": 1, "command": " ".join(["python -m benchmarks.run"] + list(argv or sys.argv[1:])),
      "suite": suite.describe(), "machine": machine, "stage_seconds": seconds,
      "notes": notes, "errors": {},
  }
  torch_ok = importlib.util.find_spec("torch") is not None
  if not torch_ok:
    notes.append("torch is not installed (pip install -e '.[bench]'): no PyTorch peer")

  # 1. peak ------------------------------------------------------------------
  peak_flops = None
  if "peak" in stages:
    with Stage("peak (matmul)", seconds):
      peak = {"float32": jax_bench.matmul_peak(suite.matmul_sizes, "float32",
                                               reps=suite.reps, warmup=suite.warmup)}
      want_bf16 = {"on": True, "off": False}.get(
          args.bf16_peak, backend != "cpu" or machine["native_bf16_cpu"])
      if want_bf16 or suite.peak_dtype == "bfloat16":
        peak["bfloat16"] = jax_bench.matmul_peak(suite.matmul_sizes, "bfloat16",
                                                 reps=suite.reps, warmup=suite.warmup)
      else:
        peak["bfloat16"] = None
        peak["bfloat16_skipped"] = ("this CPU has no bf16 matrix instructions "
                                    "(avx512_bf16/amx_bf16); --bf16-peak on measures it anyway")
      peak["used_for_fractions"] = suite.peak_dtype
      peak_flops = peak[suite.peak_dtype]["peak_flops_per_s"]
      result["peak"] = peak
      common.log(f"  peak {suite.peak_dtype}: {peak_flops / 1e9:.1f} GFLOP/s")

  # 2. training ----------------------------------------------------------------
  train: dict[str, Any] = {}
  if "train" in stages:
    wanted = [m.strip() for m in args.train_models.split(",") if m.strip()]
    runs = [("vit", suite.vit), ("ravit", suite.ravit)]
    if jax.device_count() > 1 and "vit" in wanted:
      one = suite.vit.copy_and_resolve_references()
      one.mesh.data = 1
      runs.append(("vit_one_device", one))
      wanted.append("vit_one_device")
    for name, config in runs:
      if name not in wanted:
        continue
      with Stage(f"train {name}", seconds):
        try:
          train[name] = jax_bench.train(config, steps_per_rep=suite.train_steps_per_rep,
                                        reps=suite.reps, warmup=suite.warmup,
                                        peak_flops=peak_flops,
                                        breakdown=(not suite.quick and name == (
                                            "vit" if jax.device_count() == 1
                                            else "vit_one_device")))
        except Exception as e:  # keep the other measurements
          result["errors"][f"train_{name}"] = f"{type(e).__name__}: {e}"
          common.log(f"  train {name} failed: {e}")
          continue
        r = train[name]
        frac = r["fraction_of_peak"]
        common.log(f"  train {name}: {r['images_per_s']:.1f} img/s, "
                   f"{(r['flops_per_s'] or 0) / 1e9:.1f} GFLOP/s (XLA count)"
                   + (f" = {100 * frac:.1f}% of peak" if frac else "")
                   + f", compile {r['first_step_compile_s']:.1f} s")
    result["train"] = train

  # 3. the PyTorch peer --------------------------------------------------------
  torch_res: dict[str, Any] = {"eager": None, "compile": None}
  if "torch" in stages:
    with Stage("torch peer", seconds):
      if not torch_ok:
        torch_res["eager_error"] = torch_res["compile_error"] = "torch is not installed"
      elif backend not in ("cpu", "gpu"):
        torch_res["eager_error"] = torch_res["compile_error"] = (
            f"no PyTorch peer on {backend} (torch would run on the host CPU)")
      else:
        spec = torch_vit.spec_from_config(suite.vit, suite)
        spec["device"] = "gpu" if backend == "gpu" else "cpu"
        torch_res["spec"] = spec
        for mode in ("eager", "compile"):
          if mode == "compile" and not suite.torch_compile:
            torch_res["compile_error"] = ("skipped (--quick; --torch-compile on runs it)"
                                          if suite.quick else "skipped (--torch-compile off)")
            continue
          common.log(f"  torch {mode} ...")
          timeout = suite.compile_timeout_s if mode == "compile" else suite.child_timeout_s
          r = common.run_child({"kind": "torch", "spec": spec, "compile": mode == "compile"},
                               timeout=timeout + 60)
          if "error" in r:
            torch_res[f"{mode}_error"] = r["error"]
            common.log(f"  torch {mode} failed: {r['error'][:300]}")
            continue
          torch_res[mode] = r
          common.log(f"  torch {mode}: train {r['train']['images_per_s']:.1f} img/s, "
                     f"inference {r['inference']['images_per_s']:.0f} img/s "
                     f"(first step {r['first_step_s']:.1f} s)")
        ours = common.get_path(train, "vit", "params")
        theirs = common.get_path(torch_res, "eager", "params") or common.get_path(torch_res, "compile", "params")
        torch_res["params_match"] = None if ours is None or theirs is None else ours == theirs
        if torch_res["params_match"] is False:
          raise AssertionError(f"the torch peer has {theirs} parameters, ours {ours}: "
                               "not the same model")
    result["torch"] = torch_res

  # 4. inference -------------------------------------------------------------------
  if "inference" in stages:
    with Stage("inference", seconds):
      try:
        inputs = _inference_inputs(args, suite, notes)
        result["inference"] = jax_bench.inference(
            suite.vit, suite.ravit, batch=suite.infer_batch,
            latency_images=suite.latency_images, reps=suite.reps, warmup=suite.warmup,
            buckets=suite.buckets, fractions=suite.exit_fractions, peak_flops=peak_flops,
            **inputs)
      except Exception as e:
        if isinstance(e, (AssertionError,)):
          raise
        result["errors"]["inference"] = f"{type(e).__name__}: {e}"
        common.log(f"  inference failed: {type(e).__name__}: {e}")

  # 5. batch-1 latency ----------------------------------------------------------------
  if "latency" in stages:
    with Stage("latency", seconds):
      if args.suite != "cifar":
        notes.append("latency stage: the cifar suite's models only (benchmarks/latency.py)")
      else:
        from benchmarks import latency
        # This process trains too, so it keeps async dispatch (recorded in the
        # section); `benchmarks.run latency` measures launch.predict's setting.
        lat_args = latency.parse_args(
            ["--rounds", str(4 * suite.reps), "--images", str(suite.latency_images),
             "--dispatch", "async"]
            + (["--quick"] if suite.quick else [])
            + sum(([f"--{k.replace('_', '-')}", v] for k, v in (
                ("ravit_workdir", args.ravit_workdir), ("vit_workdir", args.vit_workdir),
                ("ravit_report", args.ravit_report),
                ("erde_student_workdir", args.erde_student_workdir),
                ("erde_teacher_workdir", args.erde_teacher_workdir)) if v), []))
        try:
          result["latency"] = latency.measure(lat_args)
        except Exception as e:
          result["errors"]["latency"] = f"{type(e).__name__}: {e}"
          common.log(f"  latency failed: {type(e).__name__}: {e}")

  # 6. memory ------------------------------------------------------------------------
  if "memory" in stages:
    with Stage("memory", seconds):
      mem: dict[str, Any] = {}
      base = {"kind": "jax_train_memory", "suite": args.suite, "quick": args.quick,
              "train_batch": args.train_batch, "dtype": args.dtype,
              "steps": suite.memory_steps}
      # --quick: the ViT only (each child imports jax and compiles anew)
      for name in ("vit",) if suite.quick else ("vit", "ravit"):
        mem[f"jax_{name}"] = common.run_child(dict(base, model=name),
                                              timeout=suite.child_timeout_s)
      if torch_ok and backend in ("cpu", "gpu"):
        spec = torch_vit.spec_from_config(suite.vit, suite)
        spec["device"] = "gpu" if backend == "gpu" else "cpu"
        mem["torch_vit_eager"] = common.run_child(
            {"kind": "torch_memory", "spec": spec, "steps": suite.memory_steps},
            timeout=suite.child_timeout_s)
      for k, v in mem.items():
        if "error" in v:
          common.log(f"  memory {k} failed: {v['error'][:300]}")
        else:
          common.log(f"  memory {k}: peak RSS {v['peak_rss_bytes'] / 2 ** 20:.0f} MiB "
                     f"({v['rss_after_import_bytes'] / 2 ** 20:.0f} MiB after imports)")
      mem["batch"] = suite.train_batch
      result["memory"] = mem

  # headline figures and targets ----------------------------------------------------
  ours_train = common.get_path(train, "vit", "images_per_s")
  result["train_fraction_of_peak"] = common.get_path(train, "vit", "fraction_of_peak")
  result["train_images_per_s"] = ours_train
  result["train_compile_s"] = common.get_path(train, "vit", "first_step_compile_s")
  result["train_speedup_vs_torch_eager"] = _ratio(
      ours_train, common.get_path(torch_res, "eager", "train", "images_per_s"))
  result["train_speedup_vs_torch_compile"] = _ratio(
      ours_train, common.get_path(torch_res, "compile", "train", "images_per_s"))
  inf = result.get("inference") or {}
  result["inference_speedup_vs_torch_eager"] = _ratio(
      common.get_path(inf, "vit", "images_per_s"), common.get_path(torch_res, "eager", "inference", "images_per_s"))
  result["inference_speedup_vs_torch_compile"] = _ratio(
      common.get_path(inf, "vit", "images_per_s"), common.get_path(torch_res, "compile", "inference", "images_per_s"))
  points = inf.get("ravit_dynamic") or []
  result["early_exit_realized_over_predicted"] = (
      min(p["realized_over_predicted"] for p in points) if points else None)
  result["early_exit_batch"] = inf.get("batch")
  result["early_exit_batch1_realized_over_predicted"] = common.get_path(
      result, "latency", "early_exit_batch1_realized_over_predicted")
  result["targets"] = report.targets(result)
  seconds["total"] = time.perf_counter() - t_start
  result = _finite(result)

  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  with open(out_path, "w") as f:
    json.dump(result, f, indent=1, allow_nan=False)
  md_path = os.path.splitext(out_path)[0] + ".md"
  with open(md_path, "w") as f:
    f.write(report.markdown(result))
  common.log(f"wrote {out_path} and {md_path} ({seconds['total']:.0f} s in all)")
  for t in result["targets"]:
    common.log(f"  target {t['name']}: {t['summary']}")
  return result


if __name__ == "__main__":
  main()
