"""Markdown text of reports, comparisons and run summaries (pure: dicts in, str out).
Accuracies are shown in percent, compute in MMACs (1e6 MACs)."""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, Sequence

import numpy as np


def _pct(x: float | None, digits: int = 2) -> str:
  return "—" if x is None else f"{100 * x:.{digits}f}"


def _mmacs(x: float | None) -> str:
  return "—" if x is None else f"{x / 1e6:.2f}"


def _fractions(fr: Sequence[float] | None) -> str:
  return "—" if fr is None else " / ".join(f"{f:.2f}" for f in fr)


def _thresholds(t: Sequence[float] | None) -> str:
  if t is None or len(t) == 0:
    return "—"
  if all(v == t[0] for v in t):  # shared threshold: show it once
    return f"{t[0]:.4g}"
  return ", ".join(f"{v:.4g}" for v in t)


def _model_markdown(name: str, r: Mapping[str, Any]) -> list[str]:
  base = r.get("baseline") or {}
  b_macs = base.get("macs")
  lines = [f"## {name}", "",
           f"criterion: `{r.get('criterion')}`, {r.get('num_examples')} test examples, "
           f"{r.get('num_classes')} classes", "",
           "### Per-exit accuracy", "",
           "| exit | accuracy (%) | cumulative MMACs |", "|---:|---:|---:|"]
  for p in r["per_exit"]:
    lines.append(f"| {p['exit']} | {_pct(p['accuracy'])} | {_mmacs(p['macs'])} |")
  lines.append("")
  if base.get("accuracy") is not None:
    line = (f"**Baseline:** {_pct(base['accuracy'])} % at {_mmacs(b_macs)} MMACs")
    if "val_accuracy" in base:
      line += f" (val {_pct(base['val_accuracy'])} %)"
    at = base.get("macs_at_target")
    line += (f"; the test curve reaches {_pct(base['target_accuracy'])} % "
             f"(baseline - 0.5 pts) at "
             + (f"{_mmacs(at)} MMACs ({_pct(base['relative_macs_at_target'], 1)} % of "
                "baseline MACs)" if at is not None else "no point of the sweep"))
    lines += [line, ""]
  o = r["oracle"]
  lines += [f"**Oracle** (first correct exit): {_pct(o['accuracy'])} % at "
            f"{_mmacs(o['mean_macs'])} MMACs, exit fractions {_fractions(o['exit_fractions'])}",
            "", "### Threshold sweep (test)", "",
            "| threshold | accuracy (%) | mean MMACs | % of baseline MACs | exit fractions |",
            "|---:|---:|---:|---:|:---|"]
  for p in r["sweep"]:
    rel = p.get("relative_macs")
    lines.append(f"| {_thresholds(p['thresholds'])} | {_pct(p['accuracy'])} | "
                 f"{_mmacs(p['mean_macs'])} | {_pct(rel, 1)} | "
                 f"{_fractions(p['exit_fractions'])} |")
  lines.append("")
  if r.get("calibrated"):
    lines += ["### Calibrated on val, evaluated on test", "",
              "| target | thresholds | val acc (%) | val MMACs | test acc (%) | test MMACs "
              "| % of baseline MACs | exit fractions |",
              "|:---|---:|---:|---:|---:|---:|---:|:---|"]
    for c in r["calibrated"]:
      if "error" in c:
        lines.append(f"| {c['target']} | infeasible: {c['error']} | | | | | | |")
        continue
      lines.append(f"| {c['target']} | {_thresholds(c['thresholds'])} | "
                   f"{_pct(c['val_accuracy'])} | {_mmacs(c['val_mean_macs'])} | "
                   f"{_pct(c['test_accuracy'])} | {_mmacs(c['test_mean_macs'])} | "
                   f"{_pct(c.get('relative_macs'), 1)} | "
                   f"{_fractions(c['test_exit_fractions'])} |")
    lines.append("")
  return lines


def report_markdown(reports: Mapping[str, Mapping[str, Any]],
                    title: str = "Early-exit report") -> str:
  """Markdown text of several model reports."""
  lines = [f"# {title}", "",
           "Accuracy in %, compute in mean MMACs (1e6 multiply-accumulates) per image.", ""]
  for name, r in reports.items():
    lines += _model_markdown(name, r)
  return "\n".join(lines)


def compare_markdown(c: Mapping[str, Any]) -> str:
  """Markdown of an `eval.files.compare_runs` result (A against B on test)."""
  na, nb = c["a"], c["b"]
  lines = [f"# {na} vs {nb} (test split)", ""]
  for key, title in (("same_thresholds", "At the same entropy thresholds"),
                     ("matched_macs", "At matched mean MACs (interpolated)")):
    s = c[key]
    same = key == "same_thresholds"
    lines += [f"## {title}", "",
              f"{na} >= {nb} at {s['a_at_least_b']} of {s['points']} points; mean difference "
              f"{100 * (s['mean_difference'] or 0):+.2f} points, worst "
              f"{100 * (s.get('min_difference') or 0):+.2f}.", "",
              f"| {'threshold' if same else 'mean MMACs'} | {na} acc % | {nb} acc % |"
              + (f" {na} MMACs | {nb} MMACs |" if same else ""),
              "| --- | --- | --- |" + (" --- | --- |" if same else "")]
    for r in s["rows"]:
      if same:
        lines.append(f"| {r['threshold']:.3f} | {100 * r['a_accuracy']:.2f} | "
                     f"{100 * r['b_accuracy']:.2f} | {r['a_mean_macs'] / 1e6:.2f} | "
                     f"{r['b_mean_macs'] / 1e6:.2f} |")
      else:
        lines.append(f"| {r['mean_macs'] / 1e6:.2f} | {100 * r['a_accuracy']:.2f} | "
                     f"{100 * r['b_accuracy']:.2f} |")
    lines.append("")
  tt = c.get("teacher_target")
  if tt:
    point = tt["a_calibrated_on_val_within_budget"]
    lines += ["## Against the teacher", "",
              f"Teacher final exit: {100 * tt['teacher_final_accuracy']:.2f}% at "
              f"{tt['teacher_final_macs'] / 1e6:.2f} MMACs. {na} with per-exit thresholds "
              f"calibrated on validation for {100 * c['budget']:.0f}% of that "
              f"({tt['budget_macs'] / 1e6:.2f} MMACs), on test: "
              + ("no operating point fits the budget on validation" if point is None else
                 f"{100 * point['accuracy']:.2f}% at {point['mean_macs'] / 1e6:.2f} MMACs "
                 f"(thresholds {', '.join(f'{x:.3f}' for x in point['thresholds'])}), "
                 f"{tt['gap_points']:.2f} points below the teacher (target: within "
                 f"{tt['target_points']:g} point; {'met' if tt['met'] else 'missed'})."), ""]
  return "\n".join(lines)


def _training_time_row(s: Mapping[str, Any]) -> str:
  """The wall clock of one process is the run's training time only when that
  process started at step 0; otherwise say so and give the throughput estimate."""
  wall, start = s.get("train_seconds"), s.get("final_segment_start_step")
  estimate = s.get("train_seconds_from_throughput")
  if wall and start == 0:
    return f"| training wall time | {wall / 60:.1f} min |"
  parts = []
  if estimate:
    parts.append(f"{estimate / 60:.1f} min from the logged images/s, every segment")
  if wall:
    where = f"from step {start}" if start else "resumed or not: not recorded"
    parts.append(f"the last process {wall / 60:.1f} min ({where})")
  return f"| training time | {'; '.join(parts)} |" if parts else ""


def _machines_line(s: Mapping[str, Any]) -> str:
  trained = s.get("trained_on") or []
  if not trained:
    return (f"Summarized on: {s['summarized_on']} (the run did not record its machines; "
            "a resumed run may have trained on others)")
  def one(m):
    kind = m.get("device_kind")
    return f"{m['machine']}" + (f", {kind}" if kind and kind.lower() != "cpu" else "")
  if len(trained) == 1:
    return f"Trained on: {one(trained[0])}"
  return "Trained on: " + "; ".join(f"{one(m)} from step {m['from_step']}" for m in trained)


def summary_markdown(s: Mapping[str, Any], command: str, note: str = "") -> str:
  """Markdown of an `eval.summary.summarize` dict."""
  macs = s["exit_macs"] if isinstance(s["exit_macs"], list) else [s["exit_macs"]]
  lines = [f"# {os.path.basename(os.path.normpath(s['workdir']))}", "",
           f"Command: `{command}`" if command else "", "",
           _machines_line(s), "",
           "| metric | value |", "| --- | --- |"]
  for split in ("test", "val"):
    for k, v in sorted(s.get(split, {}).items()):
      lines.append(f"| {split} {k} | {100 * v:.2f}% |")
  lines += [f"| MACs per image (cumulative per exit) | "
            f"{', '.join(f'{m / 1e6:.2f}M' for m in macs)} |",
            f"| parameters | {s['params']:,} |",
            f"| epochs x batch | {s['epochs']} x {s['batch_size']} ({s['total_steps']} steps) |",
            f"| median training images/s | {s['median_train_images_per_sec']:.1f} |",
            _training_time_row(s),
            f"| final train loss | {s['final_train_loss']:.4f} |", ""]
  if note:
    lines += [note, ""]
  lines += ["Model config:", "", "```json", json.dumps(s["model"], indent=1), "```", ""]
  return "\n".join(lines)


def _ms(s: Mapping[str, Any] | None, scale: float = 100.0, digits: int = 2) -> str:
  """'mean ± std' of a seeds.stats dict (percent by default); the value alone
  for one seed, which has no spread to show."""
  if not s or s.get("mean") is None:
    return "—"
  text = f"{scale * s['mean']:.{digits}f}"
  if s["n"] > 1:
    text += f" ± {scale * s['std']:.{digits}f}"
  return text + (f" ({s['missing']} infeasible)" if s.get("missing") else "")


def seeds_markdown(study: Mapping[str, Any], title: str) -> str:
  """Markdown of an `eval.seeds.seed_study` dict: mean ± sample std over seeds,
  paired differences, and the claims with their numbers."""
  methods, ref = study["methods"], study["claims"]["reference"]
  others = [m for m in methods if m != ref]
  t = study["teacher"]
  several = len(study["seeds"]) > 1
  lines = [f"# {title}", "",
           (f"Seeds {', '.join(map(str, study['seeds']))} per method; every cell is the mean ± "
            "sample standard deviation over seeds" if several else
            f"One seed ({study['seeds'][0]}) per method, so no spread: every cell is that "
            "seed's value and no difference below is separated from seed noise")
           + " (accuracy in %, compute in MMACs per "
           "image, test split). Paired differences compare seed s of one method with seed s "
           "of the other. Teacher final exit: "
           f"{100 * t['final_accuracy']:.2f}% at {t['final_macs'] / 1e6:.2f} MMACs.", "",
           "Plots: `seeds_accuracy_vs_macs.png` (accuracy"
           + (", seed bands)" if several else ")")
           + (", `seeds_paired_differences.png` (paired differences against zero)"
              if others else "") + ".", "",
           "## Per-exit accuracy", "",
           "| method | " + " | ".join(f"exit {p['exit']} ({p['macs'] / 1e6:.2f} MMACs)"
                                      for p in study["per_exit"][methods[0]])
           + " | final > middle exit (seeds) |",
           "|:---|" + "---:|" * (len(study["per_exit"][methods[0]]) + 1)]
  for m in methods:
    beats = study["final_beats_middle"].get(m, [])
    lines.append(f"| {m} | " + " | ".join(_ms(p["accuracy"]) for p in study["per_exit"][m])
                 + f" | {sum(beats)} of {len(beats)} |")
  lines += ["", "## Claims", ""]
  skip = ("reference", "teacher", "teacher_readings", "budgets_unreachable", "budgets_counted")
  for name, c in study["claims"].items():
    if name in skip:
      continue
    verdict = "met" if c["met"] else "missed"
    if "everywhere" in name:
      lines.append(f"- **{name}** (seed means, every shared threshold and distinct budget): "
                   f"**{verdict}**: at least as accurate at {c['shared_thresholds_at_least']} "
                   f"of {c['shared_thresholds_points']} thresholds and "
                   f"{c['budgets_at_least']} of {c['budgets_points']} budgets; worst mean "
                   f"difference {_signed(c['worst_mean_difference'])} points"
                   + _unreachable(study["claims"]) + ".")
    else:
      lines.append(f"- **{name}** (the paired difference averaged per seed, its 95% interval "
                   f"over seeds above zero): **{verdict}**: over the shared thresholds "
                   f"{c.get('shared_thresholds', _signed(c['mean_difference_shared_thresholds']))}; "
                   f"over the distinct budgets "
                   f"{c.get('budgets', _signed(c['mean_difference_budgets']))}.")
  for tc in study["claims"]["teacher"]:
    lines.append(_teacher_line(tc, ref))
  readings = study["claims"].get("teacher_readings") or []
  if readings:
    te = t.get("exit_accuracy") or []
    lines += ["", "## Against the teacher at a fraction of its MACs", "",
              "Teacher per exit: " + ", ".join(
                  f"{100 * a:.2f}% at {m / 1e6:.2f} MMACs"
                  for a, m in zip(te, t.get("exit_macs") or [])) + ". Test accuracy of each "
              "method at <= the budget, per-exit thresholds calibrated on each seed's "
              "validation split" + (" (mean and sample std over seeds)" if several else "")
              + ", and its gap to the teacher's final exit (points).", "",
              "| budget (% of teacher MACs) | " + " | ".join(
                  f"{m} acc | {m} gap" for m in methods) + " |",
              "|---:|" + "---:|" * (2 * len(methods))]
    for r in readings:
      cells = []
      for m in methods:
        c = r["methods"][m]
        if "seed_mean_test_accuracy" in c:
          accs = [p for p in c.get("seed_test_accuracies", []) if p is not None]
          spread = f" ± {100 * float(np.std(accs, ddof=1)):.2f}" if len(accs) > 1 else ""
          cells += [f"{100 * c['seed_mean_test_accuracy']:.2f}{spread}",
                    f"{c['seed_mean_gap_points']:.2f}"]
        else:
          cells += ["infeasible", "—"]
      lines.append(f"| {100 * r['budget_fraction']:.0f} | " + " | ".join(cells) + " |")
  lines += ["", "## One shared entropy threshold for every exit (the paper's protocol)", "",
            "| threshold | " + " | ".join(f"{m} acc | {m} MMACs" for m in methods)
            + "".join(f" | {ref} - {o} (points)" for o in others) + " |",
            "|---:|" + "---:|" * (2 * len(methods) + len(others))]
  for i, row in enumerate(study["shared_thresholds"][methods[0]]):
    cells = []
    for m in methods:
      r = study["shared_thresholds"][m][i]
      cells += [_ms(r["accuracy"]), _ms(r["mean_macs"], 1e-6)]
    cells += [_ms(study["paired"][f"{ref}-{o}"]["shared_thresholds"][i]["difference"])
              for o in others]
    lines.append(f"| {row['threshold']:.3f} | " + " | ".join(cells) + " |")
  lines += ["", "## Per-exit thresholds calibrated on validation for a budget, on test", "",
            "| budget (% of teacher MACs) | MMACs | "
            + " | ".join(f"{m} acc | {m} MMACs" for m in methods)
            + "".join(f" | {ref} - {o} (points)" for o in others) + " |",
            "|---:|---:|" + "---:|" * (2 * len(methods) + len(others))]
  for j, row in enumerate(study["budgets"][methods[0]]):
    cells = []
    for m in methods:
      r = study["budgets"][m][j]
      cells += [_ms(r["test_accuracy"]), _ms(r["test_mean_macs"], 1e-6)]
    cells += [_ms(study["paired"][f"{ref}-{o}"]["budgets"][j]["difference"])
              + _ci(study["paired"][f"{ref}-{o}"]["budgets"][j].get("interval"))
              for o in others]
    same = row.get("same_policy_as")
    label = (f"{100 * row['fraction']:.0f} (= {100 * same:.0f}: same policy)" if same is not None
             else f"{100 * row['fraction']:.0f}")
    lines.append(f"| {label} | {row['budget_macs'] / 1e6:.2f} | " + " | ".join(cells) + " |")
  if study["claims"].get("budgets_unreachable"):
    cheapest = min(study["per_exit"][m][0]["macs"] for m in methods)
    lines += ["", f"—: no seed of any method has a policy within the budget on validation "
              f"(the cheapest exit costs {cheapest / 1e6:.2f} MMACs)."]
  lines.append("")
  return "\n".join(lines)


def _unreachable(claims: Mapping[str, Any]) -> str:
  fractions = claims.get("budgets_unreachable") or []
  if not fractions:
    return ""
  return (f" (the {', '.join(f'{100 * f:.0f}%' for f in fractions)} budget"
          f"{'s' if len(fractions) > 1 else ''}, below every method's cheapest exit, left out)")


def _ci(interval: Mapping[str, Any] | None) -> str:
  if not interval or not interval.get("ci"):
    return ""
  lo, hi = interval["ci"]
  return f" [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def _teacher_line(tc: Mapping[str, Any], ref: str) -> str:
  head = (f"- **best {ref} student within {tc['target_points']:g} point of the teacher at "
          f"<= {100 * tc['budget_fraction']:.0f}% of its MACs**")
  if "gap_points" not in tc:
    return f"{head}: **missed**: {tc['note']}."
  return (f"{head} (seed picked on validation: seed {tc['seed']}): "
          f"**{'met' if tc['met'] else 'missed'}**: {100 * tc['test_accuracy']:.2f}% at "
          f"{tc['test_mean_macs'] / 1e6:.2f} MMACs, {tc['gap_points']:.2f} points below the "
          f"teacher (seed mean {100 * tc['seed_mean_test_accuracy']:.2f}%, "
          f"{tc['seed_mean_gap_points']:.2f} below).")


def _signed(x: float | None) -> str:
  return "—" if x is None else f"{100 * x:+.2f}"
