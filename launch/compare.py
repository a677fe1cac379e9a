r"""Model A against model B along their accuracy/compute curves (test split).

  python -m launch.compare --a erde=runs/erde_erde --b kd=runs/erde_kd \
      --teacher runs/erde_teacher --out results/erde_cifar10_cpu/erde_vs_kd

Writes <out>.json and <out>.md: accuracies at the same entropy thresholds and at
matched mean MACs, how often A >= B, the mean difference, and (with --teacher)
A's accuracy within 25% of the teacher's final-exit MACs against the teacher's
final-exit accuracy: per-exit thresholds calibrated on A's VALIDATION logits for
that budget, then applied to the test logits (nothing is selected on test).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

flags.DEFINE_string("a", None, "name=workdir of model A")
flags.DEFINE_string("b", None, "name=workdir of model B")
flags.DEFINE_string("teacher", None, "workdir of the teacher (for the MACs-budget target)")
flags.DEFINE_float("budget", 0.25, "fraction of the teacher's final-exit MACs")
flags.DEFINE_string("out", None, "output path without extension")
FLAGS = flags.FLAGS


def main(argv):
  del argv
  from adaptive_vision import atomic, curves, reporting
  (na, da), (nb, db) = (x.split("=", 1) for x in (FLAGS.a, FLAGS.b))
  a = reporting.load_logits(os.path.join(da, "test_logits.npz"))
  b = reporting.load_logits(os.path.join(db, "test_logits.npz"))
  out = {"a": na, "b": nb, **curves.compare(a, b)}
  lines = [f"# {na} vs {nb} (test split)", ""]
  for key, title in (("same_thresholds", "At the same entropy thresholds"),
                     ("matched_macs", "At matched mean MACs (interpolated)")):
    s = out[key]
    lines += [f"## {title}", "",
              f"{na} >= {nb} at {s['a_at_least_b']} of {s['points']} points; mean difference "
              f"{100 * (s['mean_difference'] or 0):+.2f} points, worst {100 * s.get('min_difference', 0):+.2f}.", "",
              f"| {'threshold' if key == 'same_thresholds' else 'mean MMACs'} | {na} acc % | {nb} acc % |"
              + (f" {na} MMACs | {nb} MMACs |" if key == "same_thresholds" else ""),
              "| --- | --- | --- |" + (" --- | --- |" if key == "same_thresholds" else "")]
    for r in s["rows"]:
      if key == "same_thresholds":
        lines.append(f"| {r['threshold']:.3f} | {100 * r['a_accuracy']:.2f} | {100 * r['b_accuracy']:.2f} "
                     f"| {r['a_mean_macs'] / 1e6:.2f} | {r['b_mean_macs'] / 1e6:.2f} |")
      else:
        lines.append(f"| {r['mean_macs'] / 1e6:.2f} | {100 * r['a_accuracy']:.2f} | {100 * r['b_accuracy']:.2f} |")
    lines.append("")
  if FLAGS.teacher:
    t = reporting.load_logits(os.path.join(FLAGS.teacher, "test_logits.npz"))
    val = reporting.load_logits(os.path.join(da, "val_logits.npz"))
    tt = out["teacher_target"] = curves.teacher_budget_point(val, a, t, FLAGS.budget)
    t_acc, t_macs, budget = (tt["teacher_final_accuracy"], tt["teacher_final_macs"],
                             tt["budget_macs"])
    point = tt["a_calibrated_on_val_within_budget"]
    lines += ["## Against the teacher", "",
              f"Teacher final exit: {100 * t_acc:.2f}% at {t_macs / 1e6:.2f} MMACs. "
              f"{na} with per-exit thresholds calibrated on validation for "
              f"{100 * FLAGS.budget:.0f}% of that ({budget / 1e6:.2f} MMACs), on test: "
              + ("no operating point fits the budget on validation" if point is None else
                 f"{100 * point['accuracy']:.2f}% at {point['mean_macs'] / 1e6:.2f} MMACs "
                 f"(thresholds {', '.join(f'{x:.3f}' for x in point['thresholds'])}), "
                 f"{tt['gap_points']:.2f} points below the teacher (target: within 1 point; "
                 f"{'met' if tt['met'] else 'missed'})."), ""]
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  atomic.write_json(FLAGS.out + ".json", out, indent=1,
                    default=lambda o: getattr(o, "tolist", lambda: str(o))())
  atomic.write_text(FLAGS.out + ".md", "\n".join(lines))
  print(f"wrote {FLAGS.out}.md and .json", file=sys.stderr)


if __name__ == "__main__":
  flags.mark_flags_as_required(["a", "b", "out"])
  app.run(main)
