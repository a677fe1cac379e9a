r"""Reports from logits files and workdirs: the one report launcher.

Early-exit report over runs (each workdir holds test_logits.npz, and
val_logits.npz for the points calibrated on validation):

  python -m launch.report --run ravit=runs/ravit_cifar10 --baseline runs/vit_cifar10 \
      --out results/ravit_cifar10_cpu [--budgets 0.55,0.7]

  -> report.json, report.md, accuracy_vs_macs.png and copies of the npz files.

Model A against model B on test (and, with --teacher, A within --budget of the
teacher's final-exit MACs, thresholds calibrated on A's validation logits, and
whether it is within --teacher_gap_points of the teacher's accuracy: the
claims under test are these two flags, 0.25 and 1 point by default):

  python -m launch.report --a erde=runs/erde_erde --b kd=runs/erde_kd \
      --teacher runs/erde_teacher --out results/erde_cifar10_cpu/erde_vs_kd

  -> <out>.json and <out>.md.

Several methods over seeds (mean ± std, paired differences, the claims; the
budgets are fractions of the teacher's final-exit MACs, calibrated on each
seed's validation logits):

  python -m launch.report --seeds 0,1,2 --run ce=runs/erde_ce_s{seed} \
      --run kd=runs/erde_kd_s{seed} --run erde=runs/erde_erde_s{seed} \
      --teacher runs/erde_teacher --reference erde --out results/erde_cifar10_cpu

  -> seeds_report.json, seeds_report.md, seeds_accuracy_vs_macs.png,
     seeds_paired_differences.png and copies of the npz files
     (<method>_s<seed>_<split>_logits.npz).

A cascade against its baseline over seeds (the claim table: test accuracy at
<= each budget x the baseline's MACs, thresholds calibrated on each seed's
validation logits, paired differences with 95% intervals, the claims):

  python -m launch.report --seeds 0,1,2 --run ravit=runs/ravit_s{seed} \
      --baseline runs/vit_s{seed} --budgets 0.55,0.7,0.72 \
      --claims 0.72:1.7:must,0.7:0.5:goal --out results/ravit_cifar10_cpu

  -> claim_table.json, claim_table.md, claim_table.png (accuracy against MACs
     over a grid of budgets, each calibrated on validation) and copies of the npz files.

A training run's summary (accuracy per exit, MACs, images/s, wall time, machine):

  python -m launch.report --summarize runs/vit_cifar10 --out results/vit_cifar10_cpu \
      --command "python -m launch.train --config configs/vit_cifar10.py --workdir runs/vit_cifar10"

  -> <out>.json and <out>.md.

Every file is written atomically; nothing is ever selected on the test split.
"""

from __future__ import annotations

import sys

from absl import app, flags

from launch import common

flags.DEFINE_multi_string("run", [], "name=workdir of a run with *_logits.npz")
flags.DEFINE_string("baseline", None, "workdir of a single-exit baseline")
flags.DEFINE_list("budgets", ["0.55", "0.7"], "MACs budgets as fractions of the baseline")
flags.DEFINE_string("title", "Early-exit report", "report title")
flags.DEFINE_string("a", None, "compare: name=workdir of model A")
flags.DEFINE_string("b", None, "compare: name=workdir of model B")
flags.DEFINE_string("teacher", None, "compare: workdir of the teacher (MACs-budget point)")
flags.DEFINE_float("budget", 0.25, "compare: the claim's fraction of the teacher's "
                   "final-exit MACs")
flags.DEFINE_list("teacher_budgets", ["0.25"], "seed study: the fractions of the teacher's "
                  "final-exit MACs at which every method is read against the teacher (the "
                  "claim: the reference within --teacher_gap_points of it)")
flags.DEFINE_float("teacher_gap_points", 1.0, "compare and seed study: the claim, within this "
                   "many accuracy points of the teacher's final exit at --budget")
flags.DEFINE_list("seeds", [], "seed study: the seeds that fill {seed} in each --run")
flags.DEFINE_string("reference", "erde", "seed study: the method compared with the others")
flags.DEFINE_list("seed_budgets", ["0.1", "0.15", "0.2", "0.25", "0.3", "0.35"],
                  "seed study: budgets as fractions of the teacher's final-exit MACs")
flags.DEFINE_list("claims", [], "cascade seed study: budget:points:label, e.g. 0.72:1.7:must "
                  "(seed-mean accuracy at <= budget x the baseline's MACs within points of it)")
flags.DEFINE_enum("criterion", "entropy", ["entropy", "max_prob"], "cascade seed study: "
                  "the exit rule calibrated on validation (softmax entropy, the papers', or "
                  "the top softmax probability)")
flags.DEFINE_string("summarize", None, "workdir of a training run to summarize")
flags.DEFINE_string("command", "", "summarize: the command that produced the run")
flags.DEFINE_string("note", "", "summarize: a free-text note for the Markdown")
flags.DEFINE_string("out", None, "output folder (--run) or path without extension")
FLAGS = flags.FLAGS


def _named(flag: str, value: str) -> tuple[str, str]:
  name, eq, path = value.partition("=")
  if not eq or not name or not path:
    common.fail(f"--{flag} {value!r}: use --{flag} name=workdir")
  return name, path


def main(argv):
  del argv
  modes = [m for m, on in (("--run", FLAGS.run), ("--a/--b", FLAGS.a or FLAGS.b),
                           ("--summarize", FLAGS.summarize)) if on]
  if len(modes) != 1 or not FLAGS.out:
    common.fail("give --out and exactly one of: --run name=workdir (a report), "
                "--a/--b name=workdir (a comparison), --summarize workdir"
                + (f"; got {' and '.join(modes)}" if len(modes) > 1 else ""))
  if FLAGS.seeds and not (FLAGS.run and (FLAGS.teacher or FLAGS.baseline)):
    common.fail("a seed study needs --run name=folder_with_{seed} and --teacher workdir "
                "(methods against a teacher) or --baseline folder_with_{seed} (a cascade "
                "against its baseline)")
  from adaptive_vision.eval import files
  with common.clear_errors():
    if FLAGS.seeds and not FLAGS.teacher:
      if len(FLAGS.run) != 1:
        common.fail("a cascade seed study takes one --run name=folder_with_{seed}")
      name, pattern = _named("run", FLAGS.run[0])
      claims = []
      for item in FLAGS.claims:
        parts = item.split(":")
        if len(parts) != 3:
          common.fail(f"--claims {item!r}: use budget:points:label, e.g. 0.72:1.7:must")
        claims.append((float(parts[0]), float(parts[1]), parts[2]))
      files.cascade_seed_report(FLAGS.out, name, pattern, FLAGS.baseline,
                                [int(s) for s in FLAGS.seeds],
                                budgets=[float(b) for b in FLAGS.budgets], claims=claims,
                                title=FLAGS.title, criterion=FLAGS.criterion)
      written = f"{FLAGS.out}/{files.CLAIMS_MD}, {files.CLAIMS_JSON}, {files.CLAIMS_PNG}"
    elif FLAGS.seeds:
      runs = dict(_named("run", item) for item in FLAGS.run)
      study = files.seed_report(FLAGS.out, runs, [int(s) for s in FLAGS.seeds], FLAGS.teacher,
                                reference=FLAGS.reference,
                                teacher_budget=[float(b) for b in FLAGS.teacher_budgets],
                                gap_points=FLAGS.teacher_gap_points,
                                budgets=[float(b) for b in FLAGS.seed_budgets], title=FLAGS.title)
      names = [files.SEEDS_MD, files.SEEDS_JSON, files.SEEDS_PNG]
      written = f"{FLAGS.out}/" + ", ".join(names + ([files.SEEDS_DIFF_PNG] if study["paired"]
                                                     else []))
    elif FLAGS.run:
      runs = dict(_named("run", item) for item in FLAGS.run)
      files.report_runs(FLAGS.out, runs, baseline=FLAGS.baseline,
                        budgets=[float(b) for b in FLAGS.budgets], title=FLAGS.title)
      written = f"{FLAGS.out}/report.md, report.json, accuracy_vs_macs.png"
    elif FLAGS.summarize:
      files.summarize_run(FLAGS.summarize, FLAGS.out, command=FLAGS.command, note=FLAGS.note)
      written = f"{FLAGS.out}.md and .json"
    else:
      if not (FLAGS.a and FLAGS.b):
        common.fail("a comparison needs both --a name=workdir and --b name=workdir")
      files.compare_runs(FLAGS.out, _named("a", FLAGS.a), _named("b", FLAGS.b),
                         teacher=FLAGS.teacher, budget=FLAGS.budget,
                         gap_points=FLAGS.teacher_gap_points)
      written = f"{FLAGS.out}.md and .json"
    print(f"wrote {written}", file=sys.stderr)


if __name__ == "__main__":
  app.run(main)
