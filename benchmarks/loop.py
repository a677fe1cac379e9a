"""Section `loop`: the training loop against its bare step, paired in time.

The ERDE teacher (configs/erde_cifar10.py:role=teacher) on the real CIFAR-10,
in a process set up as `launch.train` sets it up:

  loop  adaptive_vision.train.loop.train_and_evaluate (data pipeline, metrics
        one step late, log lines, checkpoints at the config's cadence), `steps`
        steps per round, resumed from the previous round with stop_at_step;
        its rate comes from its own log lines (the steps between the round's
        first and last train lines: compilation and restore fall outside);
  bare  the same `train.build` step on one batch already on the device.

They alternate (`common.rounds`); figure: the median over rounds of loop
images/s over bare images/s.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time

from benchmarks import common


def window_rate(records: list[dict], batch: int, start: int) -> tuple[int, float]:
  """(steps, seconds) between the first and last train records of one
  invocation that resumed at step `start`. The loop restarts its clock after
  step start + 1 and each record's images_per_sec is cumulative from there,
  so its time since then is (step - start - 1) * batch / rate."""
  if len(records) < 2:
    raise ValueError("need two train log lines in a round: raise the loop's steps")
  elapsed = lambda r: (r["step"] - start - 1) * batch / r["images_per_sec"]
  return records[-1]["step"] - records[0]["step"], elapsed(records[-1]) - elapsed(records[0])


def measure(cfg) -> dict:
  from adaptive_vision import backend
  backend.prepare_process("train")
  import jax
  import numpy as np
  jax.config.update("jax_threefry_partitionable", True)  # as launch.common.setup
  from adaptive_vision import data
  from adaptive_vision import sharding as shd
  from adaptive_vision.train import build
  from adaptive_vision.train import loop as loop_lib
  from configs import erde_cifar10
  c = cfg.loop
  if c.steps % 4 or c.steps < 8:
    raise ValueError(f"loop steps {c.steps}: give a multiple of 4, at least 8")
  config = erde_cifar10.get_config("role=teacher")
  if c.train_size:
    config.data.train_size = c.train_size
  config.log_every = c.steps // 4
  b = config.batch_size
  per_epoch = data.dataset_info(config.data)["train_size"] // b
  # one step more than the rounds take (warm-up round included): no final evaluation
  config.num_epochs = -(-((c.rounds + 1) * c.steps + 1) // per_epoch)

  trainer = build.build(config)
  state = [trainer.init_state()]
  rng = np.random.default_rng(0)
  s = config.data.image_size
  labels = rng.integers(0, config.model.num_classes, b).astype(np.int32)
  batch = shd.global_batch({"image": rng.normal(size=(b, s, s, 3)).astype(np.float32),
                            "label": labels}, trainer.mesh)
  window = 3 * c.steps // 4  # the steps between the loop's first and last log line

  def bare() -> float:
    start = time.perf_counter()
    for _ in range(window):
      state[0], metrics = trainer.train_step(state[0], batch, None)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - start) / window

  workdir, done = tempfile.mkdtemp(prefix="bench_loop_"), [0]

  def loop() -> float:
    config.stop_at_step = done[0] + c.steps
    loop_lib.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      records = [r for r in map(json.loads, f)
                 if r["kind"] == "train" and done[0] < r["step"] <= config.stop_at_step]
    n, seconds = window_rate(records, b, done[0])
    done[0] = config.stop_at_step
    return seconds / n

  try:  # round 0 warms up (and builds the data cache on first use)
    times = common.rounds(["loop", "bare"], lambda k: {"loop": loop, "bare": bare}[k](), c.rounds)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  ratio = common.speedup(times, "bare", "loop")
  step_s = common.medians(times)
  return {"settings": dict(c.to_dict(), config="configs/erde_cifar10.py:role=teacher", batch=b,
                           window_steps=window, checkpoint_every=int(config.checkpoint_every)),
          "variants": {n: {"step_s": t, "images_per_s": b / t} for n, t in step_s.items()},
          "comparisons": {"train_loop_over_bare_step": dict(ratio, what="loop images/s over "
                                                            "the bare step's")},
          "figures": {"train_loop_over_bare_step": ratio["median"]},
          "notes": ["a smoke run on the first train_size images" if c.train_size else
                    "the whole train split"]}
