"""Several methods, several seeds each: the comparison that cannot mislead (pure).

For each method (e.g. students trained with ce, kd, erde), one (val, test)
pair of logits per seed, all seeds trained with the same recipe. Two protocols:

* shared thresholds (the ERDE paper's): one entropy threshold for every exit,
  swept over a fixed grid; accuracy and mean MACs on test at each threshold.
  Nothing is selected: the whole curve is reported.
* budgets: for each compute budget (a fraction of the teacher's final-exit
  MACs), per-exit thresholds calibrated on the seed's VALIDATION logits (the
  most accurate policy within the budget there), then applied to its test
  logits.

Each number is summarised over seeds (mean, sample standard deviation, min,
max), and the reference method is compared with every other one seed by seed
(seed s of one method against seed s of the other: same initialisation, data
order and augmentation), so the spread of the paired difference says whether a
gap is separated from seed noise. Where a pick is needed (the "best student"
of a claim) it is made on validation.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from adaptive_vision import early_exit
from adaptive_vision.eval import intervals
from adaptive_vision.eval.compare import default_thresholds
from adaptive_vision.eval.logits import ExitLogits
from adaptive_vision.eval.report import calibrated_on_val

DEFAULT_BUDGETS = (0.10, 0.15, 0.20, 0.25, 0.30, 0.35)


def stats(values: Sequence[float | None]) -> dict[str, Any]:
  """mean, sample std (ddof=1; 0 for one value), min, max and the values;
  None entries (an infeasible seed) are counted and left out."""
  vals = [float(v) for v in values if v is not None]
  out: dict[str, Any] = {"values": [None if v is None else float(v) for v in values],
                         "n": len(vals), "missing": len(values) - len(vals)}
  if not vals:
    return dict(out, mean=None, std=None, min=None, max=None)
  return dict(out, mean=float(np.mean(vals)),
              std=float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0,
              min=float(np.min(vals)), max=float(np.max(vals)))


def _budget_point(val: ExitLogits, test: ExitLogits, budget_macs: float,
                  criterion: str) -> dict[str, Any] | None:
  """Calibrated on val within the budget, evaluated on val and test; None when
  no policy fits the budget on validation."""
  try:
    return calibrated_on_val(val, test, criterion, max_mean_macs=budget_macs)
  except ValueError:
    return None


def _check_runs(runs: Mapping[str, Sequence[tuple[ExitLogits, ExitLogits]]]) -> int:
  counts = {m: len(r) for m, r in runs.items()}
  if not runs or len(set(counts.values())) != 1 or 0 in counts.values():
    raise ValueError(f"every method needs the same number (>= 1) of seeds, got {counts}")
  return next(iter(counts.values()))


def seed_study(runs: Mapping[str, Sequence[tuple[ExitLogits, ExitLogits]]],
               teacher_test: ExitLogits, *, reference: str,
               teacher_budget: float | Sequence[float],
               gap_points: float, seeds: Sequence[int] | None = None,
               thresholds: Sequence[float] | None = None,
               budgets: Sequence[float] = DEFAULT_BUDGETS,
               criterion: str = "entropy") -> dict[str, Any]:
  """The study of `runs[method] = [(val, test) per seed]` against a teacher.

  Returns a JSON-serialisable dict: per-exit accuracies, whether each seed's
  final exit beats its middle exit, both protocols per method, paired
  differences reference - other, and the paper's claims (met or missed, with
  their numbers): `reference` at least as accurate as every other method, and
  its best seed within `gap_points` accuracy points of the teacher's final
  exit at <= `teacher_budget` of its MACs.
  """
  num_seeds = _check_runs(runs)
  seeds = list(range(num_seeds)) if seeds is None else [int(s) for s in seeds]
  if len(seeds) != num_seeds:
    raise ValueError(f"{len(seeds)} seed labels for {num_seeds} seeds")
  if reference not in runs:
    raise ValueError(f"reference method {reference!r} is not among {sorted(runs)}")
  k = teacher_test.num_classes
  grid = np.asarray(default_thresholds(k) if thresholds is None else thresholds, np.float64)
  t_acc = float(np.mean(teacher_test.exit_logits[-1].argmax(-1) == teacher_test.labels))
  t_macs = float(teacher_test.exit_macs[-1])

  per_exit, final_vs_middle, shared, budget_rows = {}, {}, {}, {}
  raw_shared, raw_budget = {}, {}
  for method, pairs in runs.items():
    accs = np.array([early_exit.per_exit_accuracy(test.exit_logits, test.labels)
                     for _, test in pairs])  # [S, E]
    macs = pairs[0][1].exit_macs
    per_exit[method] = [{"exit": e, "macs": float(macs[e]), "accuracy": stats(accs[:, e])}
                        for e in range(accs.shape[1])]
    if accs.shape[1] >= 2:
      final_vs_middle[method] = [bool(a[-1] > a[-2]) for a in accs]
    sweeps = [early_exit.threshold_sweep(test.exit_logits, test.labels, test.exit_macs,
                                         criterion, thresholds=grid) for _, test in pairs]
    raw_shared[method] = np.array([[p["accuracy"] for p in s] for s in sweeps])  # [S, P]
    shared[method] = [{"threshold": float(t), "accuracy": stats(raw_shared[method][:, i]),
                       "mean_macs": stats([s[i]["mean_macs"] for s in sweeps])}
                      for i, t in enumerate(grid)]
    points = [[_budget_point(val, test, f * t_macs, criterion) for f in budgets]
              for val, test in pairs]  # [S][B]
    raw_budget[method] = points
    budget_rows[method] = [
        {"fraction": float(f), "budget_macs": float(f * t_macs),
         "test_accuracy": stats([p[j] and p[j]["test_accuracy"] for p in points]),
         "test_mean_macs": stats([p[j] and p[j]["test_mean_macs"] for p in points]),
         "val_accuracy": stats([p[j] and p[j]["val_accuracy"] for p in points]),
         "thresholds": [p[j] and p[j]["thresholds"] for p in points]}
        for j, f in enumerate(budgets)]

  # A budget that no seed of any method can meet on validation (below every
  # cheapest exit) says nothing about one method against another: it is left
  # out of the claims and listed. A budget whose calibrated policy is the
  # previous budget's for every method and seed (the budget no longer binds)
  # is the same point: it is reported once, with the previous one.
  reachable = [any(p[j] is not None for pts in raw_budget.values() for p in pts)
               for j in range(len(budgets))]
  policy = lambda j: tuple(tuple(None if p[j] is None else tuple(np.round(p[j]["thresholds"], 6))
                                 for p in raw_budget[m]) for m in runs)
  distinct = [j == 0 or policy(j) != policy(j - 1) for j in range(len(budgets))]
  for method in runs:
    for j, row in enumerate(budget_rows[method]):
      if not distinct[j]:
        row["same_policy_as"] = float(budgets[max(i for i in range(j) if distinct[i])])
  counted = [j for j in range(len(budgets)) if reachable[j] and distinct[j]]
  paired, claims = {}, {"reference": reference,
                        "budgets_unreachable": [float(f) for f, r in zip(budgets, reachable)
                                                if not r],
                        "budgets_counted": [float(budgets[j]) for j in counted]}
  for other in runs:
    if other == reference:
      continue
    key = f"{reference}-{other}"
    d_shared = raw_shared[reference] - raw_shared[other]  # [S, P]
    d_budget = [[None if a[j] is None or b[j] is None
                 else a[j]["test_accuracy"] - b[j]["test_accuracy"] for j in range(len(budgets))]
                for a, b in zip(raw_budget[reference], raw_budget[other])]
    # Per seed: the difference averaged over the sweep, and over the distinct
    # reachable budgets; over seeds, their mean and 95% interval.
    per_seed_budget_mean = [
        None if any(d[j] is None for j in counted) or not counted
        else float(np.mean([d[j] for j in counted])) for d in d_budget]
    paired[key] = {
        "shared_thresholds": [{"threshold": float(t), "difference": stats(d_shared[:, i]),
                               "interval": intervals.paired(d_shared[:, i])}
                              for i, t in enumerate(grid)],
        "budgets": [{"fraction": float(f), "difference": stats([d[j] for d in d_budget]),
                     "interval": intervals.paired([d[j] for d in d_budget]),
                     "counted": j in counted}
                    for j, f in enumerate(budgets)],
        "average_shared_thresholds": intervals.paired(d_shared.mean(axis=1)),
        "average_budgets": intervals.paired(per_seed_budget_mean)}
    shared_means = [r["difference"]["mean"] for r in paired[key]["shared_thresholds"]]
    budget_means = [paired[key]["budgets"][j]["difference"]["mean"] for j in counted]
    known = [m for m in shared_means + budget_means if m is not None]
    claims[f"{reference} >= {other} everywhere"] = {
        "met": bool(known) and all(m >= 0 for m in known)
               and None not in budget_means,
        "shared_thresholds_at_least": sum(m >= 0 for m in shared_means),
        "shared_thresholds_points": len(shared_means),
        "budgets_at_least": sum(m is not None and m >= 0 for m in budget_means),
        "budgets_points": len(budget_means),
        "worst_mean_difference": min(known) if known else None}
    avg_t, avg_b = paired[key]["average_shared_thresholds"], paired[key]["average_budgets"]
    claims[f"{reference} better than {other} on average"] = {
        # Separated from seed noise only where the 95% interval of the
        # averaged paired difference lies above zero; otherwise a trend.
        "met": bool(avg_t["above_zero"] and (avg_b["above_zero"] or avg_b["mean"] is None)),
        "mean_difference_shared_thresholds": float(np.mean(shared_means)),
        "mean_difference_budgets": (float(np.mean([m for m in budget_means if m is not None]))
                                    if any(m is not None for m in budget_means) else None),
        "shared_thresholds": intervals.verdict(avg_t, reference, other),
        "budgets": intervals.verdict(avg_b, reference, other)}

  budgets_for_teacher = ([teacher_budget] if isinstance(teacher_budget, (int, float))
                         else list(teacher_budget))
  # Every method at each teacher budget (the ~10x reading); the claim is the
  # reference's, at each budget.
  claims["teacher_readings"] = [
      {"budget_fraction": float(b), "methods": {
          m: _teacher_claim(runs[m], seeds, t_acc, t_macs, criterion, b, gap_points)
          for m in runs}} for b in budgets_for_teacher]
  claims["teacher"] = [r["methods"][reference] for r in claims["teacher_readings"]]
  return {"seeds": seeds, "methods": list(runs), "criterion": criterion,
          "teacher": {"final_accuracy": t_acc, "final_macs": t_macs,
                      "exit_accuracy": [float(a) for a in early_exit.per_exit_accuracy(
                          teacher_test.exit_logits, teacher_test.labels)],
                      "exit_macs": [float(m) for m in teacher_test.exit_macs]},
          "per_exit": per_exit, "final_beats_middle": final_vs_middle,
          "shared_thresholds": shared, "budgets": budget_rows, "paired": paired,
          "claims": claims}


def _teacher_claim(pairs, seeds, t_acc: float, t_macs: float, criterion: str,
                   budget_fraction: float, gap_points: float) -> dict:
  """The reference's best seed within `gap_points` of the teacher's final
  exit at <= `budget_fraction` of its MACs: the seed is picked by its VALIDATION
  accuracy at that budget, then reported on test; the seed mean beside it."""
  budget = budget_fraction * t_macs
  points = [_budget_point(val, test, budget, criterion) for val, test in pairs]
  feasible = [i for i, p in enumerate(points) if p is not None]
  out = {"budget_fraction": budget_fraction, "budget_macs": budget,
         "target_points": gap_points, "teacher_final_accuracy": t_acc}
  if not feasible:
    return dict(out, met=False, note="no seed has a policy within the budget on validation")
  out["seed_test_accuracies"] = [None if p is None else p["test_accuracy"] for p in points]
  best = max(feasible, key=lambda i: points[i]["val_accuracy"])
  gap = 100 * (t_acc - points[best]["test_accuracy"])
  mean_acc = float(np.mean([points[i]["test_accuracy"] for i in feasible]))
  return dict(out, seed=seeds[best], val_accuracy=points[best]["val_accuracy"],
              test_accuracy=points[best]["test_accuracy"],
              test_mean_macs=points[best]["test_mean_macs"], gap_points=gap,
              seed_mean_test_accuracy=mean_acc, seed_mean_gap_points=100 * (t_acc - mean_acc),
              met=bool(gap <= gap_points))
