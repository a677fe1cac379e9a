r"""Per-exit logits of a trained run, and its early-exit report.

  python -m launch.evaluate --config configs/ravit_cifar10.py --workdir runs/ravit_cifar10 \
      [--baseline runs/vit_cifar10] [--out results/ravit_cifar10_cpu] [--name ravit]

  python -m launch.evaluate --params results/params/ravit_cifar10.npz \
      --out results/ravit_from_params [--baseline runs/vit_cifar10] [--data_path DIR]

Restores the newest checkpoint in --workdir, writes `val_logits.npz` and
`test_logits.npz` there (exit_logits [E, N, K], labels [N], cumulative
exit_macs [E]), and, with --out, the report (report.json, report.md,
accuracy_vs_macs.png) beside copies of the npz files. With --params (a file
of launch.export) instead of --workdir, the variables and the config come
from that file (the file describes itself; a --config given is checked
against it), and the npz files go to --out; --data_path points the data at
another copy of the dataset than the one the file was trained on. Thresholds
are calibrated on the validation split held out of training, never on test.

The folders it writes to are locked as launch.train locks a workdir (one
writer at a time; adaptive_vision/workdir_lock.py): --workdir (or, with
--params, --out) while the npz files are written, --out while the report is.
If another live process holds one of them (a run still training in
--workdir, another evaluate writing the same --out), the command stops with
one line naming it, exit code 2.
"""

from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from launch import common

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line's flags; defined when run as a script only, so that tests
  and other modules can import this one's functions beside another script's."""
  config_flags.DEFINE_config_file("config", None, "config file [:args]", lock_config=True)
  flags.DEFINE_string("workdir", None, "the run's workdir (holds checkpoints/)")
  flags.DEFINE_string("params", None, "instead of --workdir: a parameters file of launch.export "
                      "(logits and report go to --out)")
  flags.DEFINE_string("baseline", None, "workdir of a single-exit baseline with *_logits.npz")
  flags.DEFINE_string("out", None, "where to write the report and copies of the npz files")
  flags.DEFINE_string("name", None, "the model's name in tables and plots")
  flags.DEFINE_list("budgets", ["0.55", "0.7"], "MACs budgets as fractions of the baseline")
  flags.DEFINE_bool("reuse_logits", False, "use existing *_logits.npz instead of recomputing")
  flags.DEFINE_string("data_path", None, "with --params: the dataset folder (default: the "
                      "training config's data.path stored in the file)")


def compute_logits(config, workdir: str, config_arg: str = "...", variables=None) -> None:
  """Writes {val,test}_logits.npz into `workdir`, of the run's newest
  checkpoint there or of `variables` (e.g. `export.load_params`).
  `config_arg`: the --config argument, for the command that trains a missing run."""
  import numpy as np
  from adaptive_vision import models, workdir_lock
  from adaptive_vision.eval import predict
  from adaptive_vision.train import checkpointing, loop

  loop.validate_config(config, workdir)
  if variables is None:
    variables = checkpointing.restore_variables(
        workdir, hint=f"train it first with `python -m launch.train --config {config_arg} "
                      f"--workdir {workdir}`")
  results = predict.evaluate(config, variables)
  with workdir_lock.hold(workdir, **workdir_lock.settings(config)):
    paths = predict.write_logits(workdir, results, models.exit_macs(config.model))
  for path, (logits, labels) in zip(paths, results.values()):
    print(f"{os.path.basename(path).split('_')[0]}: {len(labels)} examples, exit accuracies "
          + ", ".join(f"{100 * float(np.mean(l.argmax(-1) == labels)):.2f}%" for l in logits)
          + f" -> {path}", file=sys.stderr)


def main(argv):
  del argv
  if (FLAGS.workdir is None) == (FLAGS.params is None):
    common.fail("give --workdir (a run) or --params (a file of launch.export), one of them")
  if FLAGS.params and not FLAGS.out:
    common.fail("--params needs --out: where the logits and the report go")
  if FLAGS.workdir and FLAGS.config is None:
    common.fail("--workdir needs --config: the config file the run was trained with")
  if FLAGS.data_path and not FLAGS.params:
    common.fail("--data_path goes with --params (a run's --config names its data)")
  common.setup()
  workdir = FLAGS.workdir or FLAGS.out
  with common.clear_errors():
    variables, config = None, FLAGS.config
    if FLAGS.params:
      from adaptive_vision import export
      if config is None:
        config = common.config_from_params(FLAGS.params)
      if FLAGS.data_path:
        config.data.path = FLAGS.data_path
      variables = export.load_params(FLAGS.params, config)
    if not FLAGS.reuse_logits or not os.path.exists(os.path.join(workdir, "test_logits.npz")):
      compute_logits(config, workdir, config_flags.get_config_filename(FLAGS["config"])
                     if FLAGS.config is not None else "...", variables)
    if FLAGS.out:
      name = FLAGS.name or (os.path.basename(os.path.normpath(FLAGS.workdir)) if FLAGS.workdir
                            else os.path.splitext(os.path.basename(FLAGS.params))[0])
      from adaptive_vision import workdir_lock
      from adaptive_vision.eval import files
      with workdir_lock.hold(FLAGS.out, target=f"--out {FLAGS.out}",
                             **workdir_lock.settings(config)):
        files.report_runs(FLAGS.out, {name: workdir}, baseline=FLAGS.baseline,
                          budgets=[float(b) for b in FLAGS.budgets],
                          title=f"{name} early exits")
      print(f"wrote the report to {FLAGS.out}", file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  common.run(main)
