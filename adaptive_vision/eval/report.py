"""The early-exit report of one model (pure: arrays in, JSON-serialisable dict out).

Per-exit accuracy, the threshold sweep, the oracle, the baseline and points
calibrated on the validation split and evaluated on test. Accuracies are
fractions in [0, 1]; MACs are per image.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np

from adaptive_vision import early_exit
from adaptive_vision.eval.logits import ExitLogits, as_logits

# "Matches the baseline" means within this many accuracy points (fraction 0.005).
ACCURACY_TOLERANCE = 0.005


def jsonable(x: Any) -> Any:
  """Numpy -> python; non-finite floats -> None (strict JSON)."""
  if isinstance(x, Mapping):
    return {str(k): jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return jsonable(x.tolist())
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def _check_same_model(a: ExitLogits, b: ExitLogits, what: str) -> None:
  if a.num_exits != b.num_exits or a.num_classes != b.num_classes:
    raise ValueError(f"{what}: {a.num_exits} exits x {a.num_classes} classes vs "
                     f"{b.num_exits} exits x {b.num_classes} classes")
  if not np.allclose(a.exit_macs, b.exit_macs, rtol=1e-6):
    raise ValueError(f"{what}: exit_macs differ ({a.exit_macs.tolist()} vs "
                     f"{b.exit_macs.tolist()})")


def _single_exit(x: ExitLogits) -> tuple[float, float]:
  """(accuracy, MACs) of the last exit (a baseline is a single-exit model)."""
  acc = float(np.mean(np.argmax(x.exit_logits[-1], axis=-1) == x.labels))
  return acc, float(x.exit_macs[-1])


def early_exit_report(test: Any, *, val: Any = None, baseline: Any = None,
                      baseline_val: Any = None, budgets: Sequence[float] | None = None,
                      criterion: str = "entropy", num_points: int = 50,
                      name: str = "model") -> dict[str, Any]:
  """Early-exit report of one model (JSON-serialisable dict).

  Args:
    test: test-split `ExitLogits` (or a path to an npz).
    val: validation `ExitLogits` of the same model; enables calibrated points
      (thresholds chosen on val only, then evaluated on test).
    baseline: single-exit test `ExitLogits` (if it has several exits, its last
      exit is used); adds its accuracy / MACs, the sweep's MACs relative to it
      and the lowest sweep MACs reaching baseline accuracy - 0.5 points.
    baseline_val: the baseline's val logits; adds the calibrated point
      "val accuracy >= baseline val accuracy - 0.5 points".
    budgets: MAC budgets as fractions of the baseline's MACs (of the last
      exit's MACs without a baseline); one calibrated point each.
    criterion: 'entropy' or 'max_prob'.
    num_points: sweep size.

  Calibrated points always include "val accuracy >= last exit's val accuracy
  - 0.5 points". Infeasible targets are recorded with an 'error' message.
  """
  test = as_logits(test)
  args = (test.exit_logits, test.labels, test.exit_macs)
  per_exit_acc = early_exit.per_exit_accuracy(test.exit_logits, test.labels)
  report: dict[str, Any] = {
      "name": name,
      "criterion": criterion,
      "num_examples": test.num_examples,
      "num_classes": test.num_classes,
      "num_exits": test.num_exits,
      "per_exit": [{"exit": e, "accuracy": float(per_exit_acc[e]),
                    "macs": float(test.exit_macs[e])} for e in range(test.num_exits)],
      "sweep": early_exit.threshold_sweep(*args, criterion=criterion, num_points=num_points),
      "oracle": early_exit.oracle(*args),
      "baseline": None,
      "calibrated": [],
  }

  ref_macs = float(test.exit_macs[-1])
  ref_label = "the last exit's MACs"
  if baseline is not None:
    baseline = as_logits(baseline)
    b_acc, b_macs = _single_exit(baseline)
    target = b_acc - ACCURACY_TOLERANCE
    reaching = [p["mean_macs"] for p in report["sweep"] if p["accuracy"] >= target]
    at_target = min(reaching) if reaching else None
    for p in report["sweep"]:
      p["relative_macs"] = p["mean_macs"] / b_macs if b_macs else None
    report["baseline"] = {
        "accuracy": b_acc, "macs": b_macs,
        "target_accuracy": target,
        "macs_at_target": at_target,
        "relative_macs_at_target": (at_target / b_macs if at_target is not None and b_macs
                                    else None),
    }
    ref_macs, ref_label = b_macs, "the baseline's MACs"

  if val is not None:
    val = as_logits(val)
    _check_same_model(test, val, "val and test logits come from different models")
    targets: list[tuple[str, dict[str, float]]] = []
    if baseline_val is not None:
      baseline_val = as_logits(baseline_val)
      bv_acc, _ = _single_exit(baseline_val)
      report["baseline"] = report["baseline"] or {}
      report["baseline"]["val_accuracy"] = bv_acc
      targets.append(("val accuracy >= baseline val accuracy - 0.5 pts",
                      {"min_accuracy": bv_acc - ACCURACY_TOLERANCE}))
    last_val_acc = float(early_exit.per_exit_accuracy(val.exit_logits, val.labels)[-1])
    targets.append(("val accuracy >= last-exit val accuracy - 0.5 pts",
                    {"min_accuracy": last_val_acc - ACCURACY_TOLERANCE}))
    for f in budgets or ():
      targets.append((f"mean MACs <= {100 * f:g}% of {ref_label}",
                      {"max_mean_macs": f * ref_macs}))
    for label, constraint in targets:
      report["calibrated"].append(
          _calibrated_point(label, constraint, val, test, criterion,
                            report["baseline"]["macs"] if baseline is not None else None))
  return jsonable(report)


def calibrated_on_val(val: ExitLogits, test: ExitLogits, criterion: str = "entropy",
                      **constraint: float) -> dict[str, Any]:
  """Per-exit thresholds chosen on `val` under one constraint of
  `early_exit.calibrate` (max_mean_macs= or min_accuracy=), then applied to
  `val` and `test`: thresholds, val/test accuracy and mean MACs, test exit
  fractions. Raises ValueError when no thresholds meet the constraint on val.
  The one place a report turns validation logits into an operating point."""
  # Only validation logits reach calibrate; test is used to evaluate after.
  t = early_exit.calibrate(val.exit_logits, val.labels, val.exit_macs,
                           criterion=criterion, **constraint)
  on_val = early_exit.evaluate_policy(val.exit_logits, val.labels, t, val.exit_macs, criterion)
  on_test = early_exit.evaluate_policy(test.exit_logits, test.labels, t, test.exit_macs,
                                       criterion)
  return {"thresholds": [float(x) for x in t],
          "val_accuracy": float(on_val["accuracy"]),
          "val_mean_macs": float(on_val["mean_macs"]),
          "test_accuracy": float(on_test["accuracy"]),
          "test_mean_macs": float(on_test["mean_macs"]),
          "test_exit_fractions": on_test["exit_fractions"]}


def _calibrated_point(label: str, constraint: dict[str, float], val: ExitLogits,
                      test: ExitLogits, criterion: str,
                      baseline_macs: float | None) -> dict[str, Any]:
  point: dict[str, Any] = {"target": label, "constraint": constraint}
  try:
    point.update(calibrated_on_val(val, test, criterion, **constraint))
  except ValueError as e:
    point["error"] = str(e)
    return point
  point["relative_macs"] = (point["test_mean_macs"] / baseline_macs if baseline_macs else None)
  return point
