r"""Does the input pipeline keep up with the train step, and what does it cost?

  python -m benchmarks.run pipeline [--model vit|ravit|erde_teacher] [--batches 40] [--rounds 6]
      [--cpu-devices N] [--out results/bench_pipeline.json]

Uses the real CIFAR-10 configs (`erde_teacher`: configs/erde_cifar10.py:role=teacher,
the early-exit ResNet-20; the offline copy in ../shared/data/cifar10,
decoded once into the array cache; augmentation, normalization and, for
RAViT, the per-example resize to each branch's view run on the host in
grain's prefetch thread, as in training). Measures:

1. the pipeline alone: batches/s and host CPU-seconds per image;
2. the train step fed by it (exactly the trainer's loop: next batch, shard,
   step, metrics checked one step late) against the same step on a batch
   already on device, in alternating rounds; `overlap` = real-data images/s
   over synthetic images/s (1.0: the pipeline is fully hidden behind compute).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from benchmarks import common  # no jax import: XLA_FLAGS can still be set


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.run pipeline", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--model", default="vit", choices=("vit", "ravit", "erde_teacher"))
  p.add_argument("--batches", type=int, default=40, help="batches timed for the pipeline alone")
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--steps", type=int, default=5, help="train steps per round and kind")
  p.add_argument("--cpu-devices", type=int, default=1)
  p.add_argument("--train-size", type=int, default=None,
                 help="read only this many training images (smoke tests); default all")
  p.add_argument("--out", default=None)
  return p.parse_args(argv)


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.cpu_devices > 1:
    common.add_xla_flags(common.cpu_devices_flag(args.cpu_devices))
  import jax
  from adaptive_vision.data import pipeline as data_lib
  from adaptive_vision.data import sources
  from adaptive_vision import sharding as shd
  from adaptive_vision.train import build
  from benchmarks import jax_bench, suites
  common.setup_jax()
  if args.model == "erde_teacher":
    from configs import erde_cifar10
    config = erde_cifar10.get_config("role=teacher")
  else:
    suite = suites.get("cifar")
    config = suite.vit if args.model == "vit" else suite.ravit
  if args.train_size:
    config.data.train_size = args.train_size
  if config.data.source == "folder" and not os.path.exists(config.data.path):
    raise SystemExit(f"the offline CIFAR-10 copy is not at {config.data.path}")
  b = config.batch_size
  common.log(f"{args.model}: building the train iterator (decodes into the cache on first "
             f"use; cache root {sources.cache_root(config.data)}) ...")
  start = time.perf_counter()
  it = data_lib.make_train_iterator(config.data, global_batch_size=b, seed=0,
                                    views=build.data_views(config))
  for _ in range(3):
    next(it)
  setup_s = time.perf_counter() - start

  # 1. the pipeline alone
  wall, cpu = time.perf_counter(), time.process_time()
  for _ in range(args.batches):
    next(it)
  wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
  alone = {"batches": args.batches, "images_per_s": args.batches * b / wall,
           "host_cpu_ms_per_image": 1e3 * cpu / (args.batches * b),
           "cores_busy": cpu / wall}
  common.log(f"pipeline alone: {alone['images_per_s']:.0f} img/s, "
             f"{alone['host_cpu_ms_per_image']:.3f} CPU-ms per image")

  # 2. the train step, fed by the pipeline vs a batch already on device
  _, state, step, batch, mesh, _ = jax_bench.build_train(config)
  compiled = step.lower(state, batch, None).compile()
  holder = {"state": state}

  def run(real: bool) -> float:
    s, pending = holder["state"], None
    start = time.perf_counter()
    for _ in range(args.steps):
      x = shd.global_batch(next(it), mesh) if real else batch
      s, m = compiled(s, x, None)
      if pending is not None:
        jax.device_get(pending)  # the trainer checks all metrics one step late
      pending = m
    jax.block_until_ready((s, pending))
    holder["state"] = s
    return time.perf_counter() - start

  run(True), run(False)  # warm-up
  ratios, real_t, synth_t = [], [], []
  for r in range(args.rounds):
    order = (True, False) if r % 2 == 0 else (False, True)
    t = {kind: run(kind) for kind in order}
    real_t.append(t[True])
    synth_t.append(t[False])
    ratios.append(t[False] / t[True])
  n = args.steps * b
  fed = {"real_images_per_s": n / float(np.median(real_t)),
         "synthetic_images_per_s": n / float(np.median(synth_t)),
         "overlap": float(np.median(ratios)), "paired_ratios": ratios}
  common.log(f"train step: {fed['real_images_per_s']:.0f} img/s fed by the pipeline, "
             f"{fed['synthetic_images_per_s']:.0f} img/s on a device batch; "
             f"overlap {fed['overlap']:.3f} (median of {args.rounds} paired rounds)")
  result = {"command": " ".join(["python -m benchmarks.run pipeline"] + list(argv or sys.argv[1:])),
            "model": args.model, "batch": b, "devices": jax.device_count(),
            "data": {k: config.data.get(k) for k in ("source", "name", "augment",
                                                     "image_size")},
            "views": build.data_views(config),
            "setup_s": setup_s, "pipeline_alone": alone, "train_step": fed,
            "machine": common.machine_info()}
  common.write_json(result, args.out)
  return result

