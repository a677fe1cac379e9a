"""A cascade against its baseline over seeds: the claim table (pure).

For each seed s: the cascade's (val, test) logits and the baseline's, both
trained with seed s and one recipe. At each budget b (a fraction of the
baseline's MACs) the cascade's per-exit thresholds are calibrated on ITS
validation logits for mean MACs <= b x the baseline's, then applied to test;
the paired difference is cascade minus baseline of the same seed. Summaries
over seeds: mean, sample std, and for the paired differences a 95% interval
(`intervals.paired`). The claims compare seed means: the cascade's accuracy
at <= b of the MACs within `points` of the baseline's. The same calibration
over a grid of budgets gives each seed's accuracy/compute curve (`curve`),
the trade-off a user picking a budget on validation gets on test.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from adaptive_vision import early_exit
from adaptive_vision.eval import intervals
from adaptive_vision.eval.logits import ExitLogits
from adaptive_vision.eval.report import calibrated_on_val


# Budgets (fractions of the baseline's MACs) of the accuracy/compute curve.
CURVE_BUDGETS = tuple(round(0.2 + 0.025 * i, 3) for i in range(37))  # 0.2 ... 1.1


def _stats(values) -> dict:
  v = np.asarray([x for x in values if x is not None], np.float64)
  if v.size == 0:
    return {"mean": None, "std": None, "values": list(values)}
  return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "values": [None if x is None else float(x) for x in values]}


def claim_table(cascade: Sequence[tuple[ExitLogits, ExitLogits]],
                baseline: Sequence[tuple[ExitLogits, ExitLogits]], seeds: Sequence[int], *,
                budgets: Sequence[float] = (0.55, 0.70, 0.72),
                claims: Sequence[tuple[float, float, str]] = (),
                criterion: str = "entropy",
                curve_budgets: Sequence[float] = CURVE_BUDGETS) -> dict[str, Any]:
  """The table and the claims. `claims`: (budget, points, label) triples, e.g.
  (0.72, 1.7, 'must'): seed-mean accuracy at <= budget x the baseline's MACs
  within `points` of the seed-mean baseline."""
  if not (len(cascade) == len(baseline) == len(seeds)) or not seeds:
    raise ValueError(f"one cascade and one baseline run per seed: got {len(cascade)}, "
                     f"{len(baseline)} for seeds {list(seeds)}")
  base_macs = float(baseline[0][1].exit_macs[-1])
  rows = []
  for s, (c_val, c_test), (b_val, b_test) in zip(seeds, cascade, baseline):
    if float(b_test.exit_macs[-1]) != base_macs:
      raise ValueError(f"seed {s}: the baseline costs {b_test.exit_macs[-1]} MACs, seed "
                       f"{seeds[0]}'s {base_macs}: the seeds must train one model")
    row = {"seed": int(s),
           "baseline_test": float(np.mean(b_test.exit_logits[-1].argmax(-1) == b_test.labels)),
           "baseline_val": float(np.mean(b_val.exit_logits[-1].argmax(-1) == b_val.labels)),
           "cascade_exits_test": [float(a) for a in
                                  early_exit.per_exit_accuracy(c_test.exit_logits, c_test.labels)],
           "cascade_exits_val": [float(a) for a in
                                 early_exit.per_exit_accuracy(c_val.exit_logits, c_val.labels)],
           "budgets": []}
    for b in budgets:
      try:
        p = calibrated_on_val(c_val, c_test, criterion, max_mean_macs=b * base_macs)
      except ValueError as e:
        row["budgets"].append({"budget": float(b), "error": str(e)})
        continue
      row["budgets"].append({
          "budget": float(b), "test_accuracy": p["test_accuracy"],
          "val_accuracy": p["val_accuracy"], "thresholds": p["thresholds"],
          "test_macs_fraction": p["test_mean_macs"] / base_macs,
          "test_exit_fractions": [float(x) for x in p["test_exit_fractions"]],
          "difference": p["test_accuracy"] - row["baseline_test"]})
    row["curve"] = []
    for b in curve_budgets:
      try:
        p = calibrated_on_val(c_val, c_test, criterion, max_mean_macs=b * base_macs)
      except ValueError:  # below the cheapest exit
        continue
      row["curve"].append({"budget": float(b), "test_accuracy": p["test_accuracy"],
                           "test_macs_fraction": p["test_mean_macs"] / base_macs})
    rows.append(row)
  summary = {"baseline_test": _stats([r["baseline_test"] for r in rows]),
             "cascade_exits_test": [_stats([r["cascade_exits_test"][e] for r in rows])
                                    for e in range(len(rows[0]["cascade_exits_test"]))],
             "budgets": []}
  for j, b in enumerate(budgets):
    got = [r["budgets"][j] for r in rows]
    summary["budgets"].append({
        "budget": float(b),
        "test_accuracy": _stats([g.get("test_accuracy") for g in got]),
        "test_macs_fraction": _stats([g.get("test_macs_fraction") for g in got]),
        "difference": intervals.paired([g.get("difference") for g in got])})
  verdicts = []
  for budget, points, label in claims:
    j = [float(b) for b in budgets].index(float(budget))
    acc = summary["budgets"][j]["test_accuracy"]["mean"]
    base = summary["baseline_test"]["mean"]
    gap = None if acc is None else 100 * (base - acc)
    verdicts.append({"label": label, "budget": float(budget), "points": float(points),
                     "cascade_mean": acc, "baseline_mean": base, "gap_points": gap,
                     "met": bool(gap is not None and gap <= points)})
  return {"seeds": [int(s) for s in seeds], "baseline_macs": base_macs, "criterion": criterion,
          "rows": rows, "summary": summary, "claims": verdicts}


def markdown(table: dict, title: str) -> str:
  """The claim table as Markdown (accuracy in %, paired differences in points)."""
  pct = lambda x: "—" if x is None else f"{100 * x:.2f}"
  ms = lambda s: "—" if s["mean"] is None else f"{100 * s['mean']:.2f} ± {100 * s['std']:.2f}"
  budgets = [b["budget"] for b in table["summary"]["budgets"]]
  lines = [f"# {title}", "",
           f"Seeds {', '.join(map(str, table['seeds']))}; test accuracy (%) of the baseline "
           f"and of the cascade at <= b x the baseline's MACs ({table['baseline_macs'] / 1e6:.2f} "
           f"MMACs), per-exit {table['criterion']} thresholds calibrated on each seed's "
           "validation split; "
           "differences are cascade - baseline of the same seed, in points. `claim_table.png`: "
           "the same calibration over a grid of budgets, each seed and the mean.", "",
           "| seed | baseline | " + " | ".join(
               f"<= {b:.2f}x: acc (MACs, diff)" for b in budgets) + " | cascade exits |",
           "|---:|---:|" + "---:|" * len(budgets) + ":---|"]
  for r in table["rows"]:
    cells = []
    for p in r["budgets"]:
      cells.append("infeasible" if "error" in p else
                   f"{pct(p['test_accuracy'])} ({100 * p['test_macs_fraction']:.1f}%, "
                   f"{100 * p['difference']:+.2f})")
    lines.append(f"| {r['seed']} | {pct(r['baseline_test'])} | " + " | ".join(cells)
                 + " | " + " / ".join(pct(a) for a in r["cascade_exits_test"]) + " |")
  s = table["summary"]
  cells = []
  for b in s["budgets"]:
    d = b["difference"]
    ci = (f", CI [{100 * d['ci'][0]:+.2f}, {100 * d['ci'][1]:+.2f}]" if d.get("ci") else "")
    diff = "—" if d["mean"] is None else f"{100 * d['mean']:+.2f} ± {100 * (d['std'] or 0):.2f}"
    cells.append(f"{ms(b['test_accuracy'])} ({100 * (b['test_macs_fraction']['mean'] or 0):.1f}%, "
                 f"{diff}{ci})")
  lines.append(f"| mean ± std | {ms(s['baseline_test'])} | " + " | ".join(cells) + " | "
               + " / ".join(ms(e) for e in s["cascade_exits_test"]) + " |")
  if table["claims"]:
    lines += ["", "Claims (seed means):", ""]
    for c in table["claims"]:
      gap = "—" if c["gap_points"] is None else f"{c['gap_points']:.2f}"
      lines.append(f"- **{c['label']}**: within {c['points']:g} points of the baseline at "
                   f"<= {c['budget']:g}x its MACs: **{'met' if c['met'] else 'missed'}** "
                   f"(cascade {pct(c['cascade_mean'])}%, baseline {pct(c['baseline_mean'])}%, "
                   f"gap {gap} points)")
  return "\n".join(lines) + "\n"
