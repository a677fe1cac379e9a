r"""Train and evaluate a config.

  python -m launch.train --config configs/vit_cifar10.py[:ARGS] --workdir DIR \
      [--config.key=value ...] [--distributed]

Started again with the same command, a run resumes from the newest complete
checkpoint in DIR.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from launch import common

config_flags.DEFINE_config_file("config", None, "config file [:args]", lock_config=True)
flags.DEFINE_string("workdir", None, "where checkpoints, metrics and logits go")
flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-host)")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  common.setup(FLAGS.distributed)
  from adaptive_vision.train import loop
  config = FLAGS.config
  try:
    summary = loop.train_and_evaluate(config, FLAGS.workdir)
  except loop.NonFiniteError as e:
    common.fail(str(e), code=3)
  except (ValueError, FileNotFoundError) as e:
    common.fail(str(e))
  test = summary.get("test", {})
  print(f"done: step {summary['step']}, test accuracy {100 * test.get('accuracy', float('nan')):.2f}%"
        f", {summary['train_seconds']:.0f} s training; outputs in {FLAGS.workdir}", file=sys.stderr)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  common.run(main)
