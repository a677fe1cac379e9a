r"""The whole training loop against its bare train step, paired in time.

  python -m benchmarks.run loop [--rounds 6] [--steps 100] [--train-size N]
      [--out results/bench_loop.json] [--update results/bench_cpu.json]

The ERDE teacher (configs/erde_cifar10.py:role=teacher, ResNet-20 with its two
exit heads) on the real CIFAR-10 (the offline copy in ../shared/data/cifar10):

  loop  `launch.train`'s own loop (adaptive_vision.train.loop.train_and_evaluate:
        data pipeline, sharding, metrics checked one step late, log lines,
        checkpoints at the config's cadence), `--steps` steps per round, resumed
        from the previous round's checkpoint with stop_at_step. Its rate comes
        from its own log lines: the steps between the first and the last
        train line of the round, so compilation, restore and the first step
        are outside the window;
  bare  the same compiled train step on one batch already on the device, the
        same number of steps, nothing read back until the end (what
        `benchmarks.run cnn` times as `teacher`).

The two alternate (order reversed every other round), so a slow minute of a
shared machine hits both; a loop and a bare step measured minutes apart
differed by more than the loop costs (results/bench_notes.md). Figure of
merit: the median over rounds of loop images/s over bare images/s
(`train_loop_over_bare_step` with `--update`), with quartiles and the ratio of
the summed times.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from benchmarks import common  # no jax import: XLA_FLAGS can still be set


def parse_args(argv=None):
  p = argparse.ArgumentParser(prog="python -m benchmarks.run loop", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--rounds", type=int, default=6)
  p.add_argument("--steps", type=int, default=100,
                 help="loop steps per round (a multiple of 4: the loop logs every steps/4)")
  p.add_argument("--train-size", type=int, default=None,
                 help="read only this many training images (smoke tests); default all")
  p.add_argument("--workdir", default=None,
                 help="the loop's workdir (default: a temporary folder, removed at the end)")
  p.add_argument("--out", default=None)
  p.add_argument("--update", default=None,
                 help="existing results JSON to receive train_loop_over_bare_step")
  return p.parse_args(argv)


def window_rate(records: list[dict], batch: int, start: int) -> tuple[int, float]:
  """(steps, seconds) between the first and last train records of one
  invocation that resumed at step `start`. The loop restarts its clock after
  step start + 1, and each record's images_per_sec is cumulative from there,
  so its time since then is (step - start - 1) * batch / rate."""
  if len(records) < 2:
    raise ValueError("need two train log lines in a round: raise --steps")
  elapsed = lambda r: (r["step"] - start - 1) * batch / r["images_per_sec"]
  return records[-1]["step"] - records[0]["step"], elapsed(records[-1]) - elapsed(records[0])


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.steps % 4 or args.steps < 8:
    raise SystemExit(f"--steps {args.steps}: give a multiple of 4, at least 8")
  import jax
  common.setup_jax()
  from adaptive_vision.data import sources as data_sources
  from adaptive_vision.train import loop as loop_lib
  from benchmarks import jax_bench
  from configs import erde_cifar10
  config = erde_cifar10.get_config("role=teacher")
  if config.data.source == "folder" and not os.path.exists(config.data.path):
    raise SystemExit(f"the offline CIFAR-10 copy is not at {config.data.path}")
  if args.train_size:
    config.data.train_size = args.train_size
  config.log_every = args.steps // 4
  b = config.batch_size
  steps_per_epoch = data_sources.dataset_info(config.data)["train_size"] // b
  config.epochs = max(1, -(-(args.rounds + 1) * args.steps // steps_per_epoch))  # + warm-up
  workdir = args.workdir or tempfile.mkdtemp(prefix="bench_loop_")
  own_workdir = args.workdir is None

  common.log("bare step: compiling ...")
  _, state, step, batch, _, _ = jax_bench.build_train(config)
  compiled = step.lower(state, batch, None).compile()
  holder = {"state": state}
  window = 3 * args.steps // 4  # the steps the loop's window covers

  def bare() -> float:
    s, m = holder["state"], None
    start = time.perf_counter()
    for _ in range(window):
      s, m = compiled(s, batch, None)
    jax.block_until_ready((s, m))
    holder["state"] = s
    return (time.perf_counter() - start) / window

  done = {"step": 0}

  def loop() -> float:
    start_step = done["step"]
    config.stop_at_step = start_step + args.steps
    loop_lib.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [json.loads(line) for line in f]
    mine = [r for r in records
            if r["kind"] == "train" and start_step < r["step"] <= config.stop_at_step]
    n, seconds = window_rate(mine, b, start_step)
    done["step"] = config.stop_at_step
    return seconds / n

  try:  # round 0 warms up (its loop also decodes the data cache on first use)
    times = common.interleaved_rounds(["loop", "bare"], lambda k: {"loop": loop, "bare": bare}[k](),
                                      args.rounds)
  finally:
    if own_workdir:
      shutil.rmtree(workdir, ignore_errors=True)
  loop_t, bare_t = np.asarray(times["loop"]), np.asarray(times["bare"])
  ratios = bare_t / loop_t  # loop images/s over bare images/s
  result = {
      "command": " ".join(["python -m benchmarks.run loop"] + list(argv or sys.argv[1:])),
      "config": "configs/erde_cifar10.py:role=teacher", "batch": b,
      "train_size": args.train_size,  # set: a smoke run, not judged
      "steps_per_round": args.steps, "window_steps": window, "rounds": args.rounds,
      "checkpoint_every": int(config.checkpoint_every), "log_every": int(config.log_every),
      "loop_images_per_s": float(b / np.median(loop_t)),
      "bare_images_per_s": float(b / np.median(bare_t)),
      "loop_over_bare": {"median": float(np.median(ratios)),
                         "quartiles": [float(np.percentile(ratios, 25)),
                                       float(np.percentile(ratios, 75))],
                         "summed_time_ratio": float(bare_t.sum() / loop_t.sum()),
                         "paired_ratios": ratios.tolist()},
      "step_times_s": {"loop": loop_t.tolist(), "bare": bare_t.tolist()},
      "machine": common.machine_info()}
  r = result["loop_over_bare"]
  common.log(f"loop {result['loop_images_per_s']:.1f} img/s, bare step "
             f"{result['bare_images_per_s']:.1f} img/s: loop / bare {r['median']:.3f} "
             f"[{r['quartiles'][0]:.3f}, {r['quartiles'][1]:.3f}] (median of {args.rounds} "
             f"paired rounds; summed times {r['summed_time_ratio']:.3f})")
  common.write_json(result, args.out)
  if args.update:
    from benchmarks import report
    with open(args.update) as f:
      target = json.load(f)
    target["train_loop"] = {k: result[k] for k in ("command", "machine", "train_size",
                                                   "loop_images_per_s", "bare_images_per_s",
                                                   "loop_over_bare")}
    target["train_loop_over_bare_step"] = r["median"]
    report.rewrite(args.update, target)
  return result
