r"""A trained run's variables in one portable file, with calibrated thresholds.

  python -m launch.export --config configs/ravit_cifar10.py --workdir runs/ravit_cifar10 \
      --out results/params/ravit_cifar10.npz [--budgets 0.55,0.7] \
      [--baseline_config configs/vit_cifar10.py] [--criterion entropy|max_prob]
  python -m launch.export --config configs/ravit_cifar10.py --params results/params/ravit_cifar10.npz \
      --out results/params/ravit_cifar10.npz --criterion max_prob ...

Reads the newest checkpoint of --workdir (or, with --params, the variables of
a file this command wrote: thresholds for another exit rule or other budgets
without the run's folder; its source and training config are kept) and writes --out: a NumPy .npz of
the params (and BatchNorm statistics) keyed by their '/'-joined paths, plus
meta.json (model config, parameter shapes, exit MACs, eval preprocessing,
class names, the whole training config, source step) -- see
adaptive_vision/export.py, which does the work. For each budget it stores
the --criterion's thresholds (entropy by default) calibrated on the validation split (held out of
training; never test) for mean MACs <= budget x the reference MACs: the
model's last exit, or with --baseline_config that config's model (e.g. the
ViT a RAViT is compared with, as launch.evaluate's report does).
`launch.predict --budget B` and `launch.evaluate --params` read the file.

--out is written in one piece (a temporary file renamed over it) while the
command holds the lock `.<name of --out>.lock` beside it (as launch.train
locks a workdir, adaptive_vision/workdir_lock.py): a second export to the
same file while one writes it stops with one line naming the first, exit
code 2. Exports of other files to the same folder do not wait for each other.
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
  config_flags.DEFINE_config_file("config", None, "config file [:args] of the run", lock_config=True)
  config_flags.DEFINE_config_file("baseline_config", None,
                                  "optional: budgets are fractions of this model's MACs")
  flags.DEFINE_string("workdir", None, "the run's workdir (holds checkpoints/)")
  flags.DEFINE_string("params", None, "instead of --workdir: a file written by this command, "
                      "whose variables are re-calibrated (--out may be the same file)")
  flags.DEFINE_string("out", None, "the file to write (.npz)")
  flags.DEFINE_list("budgets", ["0.55", "0.7"],
                    "MACs budgets (fractions of the reference MACs) to calibrate thresholds for")
  flags.DEFINE_enum("criterion", "entropy", ["entropy", "max_prob"],
                    "the exit rule the thresholds are for: softmax entropy below the threshold "
                    "(the papers') or the top softmax probability above it")


def export(config, workdir: str, out: str, budgets, baseline_config=None,
           config_arg: str = "...", criterion: str = "entropy") -> dict:
  """Restores the newest checkpoint of `workdir` and writes `out`
  (`adaptive_vision.export.export_variables`)."""
  from adaptive_vision.train import checkpointing, loop
  loop.validate_config(config, workdir)
  variables = checkpointing.restore_variables(
      workdir, hint=f"train it first with `python -m launch.train --config {config_arg} "
                    f"--workdir {workdir}`")
  ckpts = os.path.join(workdir, "checkpoints")
  done = [int(d) for d in os.listdir(ckpts) if d.isdigit()] if os.path.isdir(ckpts) else []
  # Paths as given on the command line: the file travels, an absolute path would name this machine.
  return _write(config, variables, out, budgets, baseline_config, criterion,
                source={"workdir": workdir, "step": max(done) if done else None})


def _write(config, variables, out: str, budgets, baseline_config, criterion: str,
           source: dict) -> dict:
  """`export_variables` into `out` while holding the lock beside it."""
  from adaptive_vision import export as export_lib
  from adaptive_vision import workdir_lock
  folder, name = os.path.split(os.path.abspath(out))
  with workdir_lock.hold(folder, name=f".{name}.lock", target=f"--out {out}",
                         **workdir_lock.settings(config)):
    return export_lib.export_variables(
        config, variables, out, budgets,
        reference_model=None if baseline_config is None else baseline_config.model,
        source=source, criterion=criterion)


def recalibrate(config, params: str, out: str, budgets, baseline_config=None,
                criterion: str = "entropy") -> dict:
  """`export` from the variables of a parameters file instead of a workdir:
  the thresholds are calibrated again (on validation) for `criterion` and
  `budgets`; the file's source (workdir, step, training config) is kept."""
  from adaptive_vision import export as export_lib
  variables, old = export_lib.load(params, config)
  return _write(config, variables, out, budgets, baseline_config, criterion,
                source=dict(old.get("source") or {}, recalibrated_from=params))


def main(argv):
  del argv
  common.setup()
  with common.clear_errors():
    if (FLAGS.workdir is None) == (FLAGS.params is None):
      raise ValueError("give --workdir RUN (a trained run) or --params FILE (an exported file), "
                       "one of them")
    if FLAGS.params is not None:
      meta = recalibrate(FLAGS.config, FLAGS.params, FLAGS.out, FLAGS.budgets,
                         FLAGS.baseline_config, FLAGS.criterion)
    else:
      meta = export(FLAGS.config, FLAGS.workdir, FLAGS.out, FLAGS.budgets, FLAGS.baseline_config,
                    config_flags.get_config_filename(FLAGS["config"]), FLAGS.criterion)
  cal = meta["calibration"]
  print(f"wrote {FLAGS.out} ({meta['size'] / 2 ** 20:.1f} MiB, step {meta['source']['step']}); "
        f"validation ({cal['num_examples']} images) accuracy per exit "
        + ", ".join(f"{100 * a:.2f}%" for a in cal["val_exit_accuracy"]), file=sys.stderr)
  for p in cal["budgets"]:
    if "error" in p:
      print(f"  budget {p['budget']:g}: {p['error']}", file=sys.stderr)
    else:
      print(f"  budget {p['budget']:g} of {cal['reference']}'s MACs: {cal['criterion']} thresholds "
            f"{[round(t, 4) for t in p['thresholds']]}, val accuracy "
            f"{100 * p['val_accuracy']:.2f}%, {p['val_mean_macs'] / 1e6:.2f} MMACs",
            file=sys.stderr)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["config", "out"])
  common.run(main)
