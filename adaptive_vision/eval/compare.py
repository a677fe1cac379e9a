"""Comparing accuracy/compute curves of early-exit models (pure, numpy).

Two models' sweeps are compared two ways: at the same entropy thresholds (the
sweep grid the ERDE paper reports) and at matched mean compute (accuracy
interpolated along each curve at common MACs values), since the same threshold
can cost different compute in different models.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from adaptive_vision import early_exit
from adaptive_vision.eval.report import calibrated_on_val


def _curve(points: Sequence[dict]) -> tuple[np.ndarray, np.ndarray]:
  macs = np.array([p["mean_macs"] for p in points], dtype=np.float64)
  acc = np.array([p["accuracy"] for p in points], dtype=np.float64)
  order = np.argsort(macs, kind="stable")
  macs, acc = macs[order], acc[order]
  # Several thresholds can land on the same compute; average their accuracies
  # there (taking the best would select on the split being reported).
  uniq, idx = np.unique(macs, return_inverse=True)
  total = np.zeros(len(uniq))
  np.add.at(total, idx, acc)
  return uniq, total / np.bincount(idx, minlength=len(uniq))


def default_thresholds(num_classes: int, points: int = 20) -> np.ndarray:
  """The paper's shared-threshold grid: `points` entropy thresholds evenly
  spaced in (0, log K] (0 would mean nobody exits early)."""
  return np.linspace(0.0, float(np.log(num_classes)), points + 1)[1:]


def accuracy_at_macs(points: Sequence[dict], macs: np.ndarray) -> np.ndarray:
  """Accuracy of a sweep linearly interpolated at the given mean MACs."""
  x, y = _curve(points)
  return np.interp(np.asarray(macs, dtype=np.float64), x, y)


def compare(a: Any, b: Any, *, thresholds: Sequence[float] | None = None,
            num_grid: int = 25, criterion: str = "entropy") -> dict:
  """Model `a` against model `b` (ExitLogits-like: exit_logits, labels, exit_macs).

  Returns, for shared thresholds and for a grid of matched MACs inside the
  range both curves cover: each point, the number of points where a >= b, and
  the mean accuracy difference a - b (in accuracy units, not points).
  """
  if thresholds is None:
    thresholds = default_thresholds(a.exit_logits.shape[-1])
  thresholds = np.asarray(thresholds, dtype=np.float64)
  sa = early_exit.threshold_sweep(a.exit_logits, a.labels, a.exit_macs, criterion,
                                  thresholds=thresholds)
  sb = early_exit.threshold_sweep(b.exit_logits, b.labels, b.exit_macs, criterion,
                                  thresholds=thresholds)
  same = [{"threshold": float(t), "a_accuracy": pa["accuracy"], "b_accuracy": pb["accuracy"],
           "a_mean_macs": pa["mean_macs"], "b_mean_macs": pb["mean_macs"]}
          for t, pa, pb in zip(thresholds, sa, sb)]
  dense_a = early_exit.threshold_sweep(a.exit_logits, a.labels, a.exit_macs, criterion,
                                       num_points=200)
  dense_b = early_exit.threshold_sweep(b.exit_logits, b.labels, b.exit_macs, criterion,
                                       num_points=200)
  xa, _ = _curve(dense_a)
  xb, _ = _curve(dense_b)
  lo, hi = max(xa[0], xb[0]), min(xa[-1], xb[-1])
  matched = []
  if hi > lo:
    grid = np.linspace(lo, hi, num_grid)
    acc_a, acc_b = accuracy_at_macs(dense_a, grid), accuracy_at_macs(dense_b, grid)
    matched = [{"mean_macs": float(m), "a_accuracy": float(x), "b_accuracy": float(y)}
               for m, x, y in zip(grid, acc_a, acc_b)]

  def stats(rows):
    if not rows:
      return {"points": 0, "a_at_least_b": 0, "mean_difference": None}
    d = np.array([r["a_accuracy"] - r["b_accuracy"] for r in rows])
    return {"points": len(rows), "a_at_least_b": int(np.sum(d >= 0)),
            "mean_difference": float(d.mean()), "min_difference": float(d.min())}

  return {"same_thresholds": {"rows": same, **stats(same)},
          "matched_macs": {"rows": matched, **stats(matched)}}


def teacher_budget_point(a_val, a_test, teacher_test, budget_fraction: float,
                         gap_points: float) -> dict:
  """Model A within `budget_fraction` of the teacher's final-exit MACs, and
  whether its accuracy there is within `gap_points` of the teacher's final exit
  (the claim under test; launch.report's --budget and --teacher_gap_points).

  Per-exit thresholds are calibrated on A's VALIDATION logits (the most
  accurate policy whose mean MACs fit the budget there), then applied to A's
  test logits; nothing is selected on test. `point` is None when no policy
  fits the budget on validation.
  """
  t_acc = float((np.argmax(teacher_test.exit_logits[-1], -1) == teacher_test.labels).mean())
  t_macs = float(teacher_test.exit_macs[-1])
  budget = budget_fraction * t_macs
  try:
    p = calibrated_on_val(a_val, a_test, max_mean_macs=budget)
  except ValueError:
    point = None
  else:
    point = {"thresholds": p["thresholds"], "accuracy": p["test_accuracy"],
             "mean_macs": p["test_mean_macs"]}
  gap = None if point is None else 100 * (t_acc - point["accuracy"])
  return {"teacher_final_accuracy": t_acc, "teacher_final_macs": t_macs,
          "budget_macs": budget, "a_calibrated_on_val_within_budget": point,
          "gap_points": gap, "target_points": gap_points,
          "met": bool(gap is not None and gap <= gap_points)}
