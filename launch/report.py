r"""One early-exit report over several runs' logits files.

  python -m launch.report --run ravit=runs/ravit_cifar10 --baseline runs/vit_cifar10 \
      --out results/ravit_cifar10_cpu
  python -m launch.report --run teacher=runs/erde_teacher --run ce=runs/erde_ce \
      --run kd=runs/erde_kd --run erde=runs/erde_erde --out results/erde_cifar10_cpu

Each run directory holds test_logits.npz (and val_logits.npz for calibrated
operating points), as written at the end of training or by launch.evaluate.
Writes report.json, report.md, accuracy_vs_macs.png and copies of the npz files.
"""

from __future__ import annotations

import sys

from absl import app, flags

from launch import common


flags.DEFINE_multi_string("run", [], "name=workdir of a run with *_logits.npz")
flags.DEFINE_string("baseline", None, "workdir of a single-exit baseline")
flags.DEFINE_string("out", None, "output folder")
flags.DEFINE_list("budgets", ["0.55", "0.7"], "MACs budgets as fractions of the baseline")
flags.DEFINE_string("title", "Early-exit report", "report title")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  runs = {}
  for item in FLAGS.run:
    name, eq, path = item.partition("=")
    if not eq:
      common.fail(f"--run {item!r}: use --run name=workdir")
    runs[name] = path
  if not runs or not FLAGS.out:
    common.fail("give at least one --run name=workdir and --out DIR")
  try:
    from adaptive_vision import reporting
    reporting.report_runs(FLAGS.out, runs, baseline=FLAGS.baseline,
                          budgets=[float(b) for b in FLAGS.budgets], title=FLAGS.title)
    print(f"wrote {FLAGS.out}/report.md, report.json, accuracy_vs_macs.png", file=sys.stderr)
  except (ValueError, FileNotFoundError) as e:
    common.fail(str(e))
  except common.WriteError as e:  # disk full, read-only folder: the previous files stand
    common.fail(f"{e}; free space (or make the folder writable) and run the same command again",
                code=4)


if __name__ == "__main__":
  app.run(main)
