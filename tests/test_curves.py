"""Curve comparison: interpolation and matched-compute comparison by hand."""

import numpy as np
import pytest

from adaptive_vision.eval import compare as curves
from adaptive_vision.eval.logits import ExitLogits


def test_accuracy_at_macs_interpolates_and_averages_duplicates():
  # Two thresholds at the same compute: their mean, never the better one (that
  # would be a selection on the reported split).
  pts = [dict(mean_macs=1.0, accuracy=0.5), dict(mean_macs=3.0, accuracy=0.9),
         dict(mean_macs=1.0, accuracy=0.6)]
  np.testing.assert_allclose(curves.accuracy_at_macs(pts, np.array([1.0, 2.0, 3.0])),
                             [0.55, 0.725, 0.9])


def _logits(correct_first, correct_last, confident_first):
  """2 exits, 2 classes, label 0; exit 0 confident where asked."""
  n = len(correct_first)
  e0 = np.zeros((n, 2), np.float32)
  e1 = np.zeros((n, 2), np.float32)
  for i in range(n):
    sign0 = 1 if correct_first[i] else -1
    e0[i] = [sign0 * (8.0 if confident_first[i] else 0.1), 0]
    e1[i] = [8.0 if correct_last[i] else -8.0, 0]
  return ExitLogits(np.stack([e0, e1]), np.zeros(n, np.int64), np.array([1.0, 3.0]))


def test_compare_prefers_the_model_whose_confident_exits_are_right():
  # Same exits, but model a is confident only where exit 0 is right; b the reverse.
  a = _logits([1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0])
  b = _logits([1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1])
  out = curves.compare(a, b, thresholds=[0.1, 0.5])
  rows = out["same_thresholds"]["rows"]
  # Threshold 0.1: a sends its 2 right confident examples out early (acc 1.0, MACs 2.0);
  # b sends its 2 wrong confident ones (acc 0.5, MACs 2.0).
  assert rows[0]["a_accuracy"] == pytest.approx(1.0)
  assert rows[0]["b_accuracy"] == pytest.approx(0.5)
  assert rows[0]["a_mean_macs"] == pytest.approx(2.0)
  assert out["same_thresholds"]["a_at_least_b"] == 2
  assert out["matched_macs"]["mean_difference"] > 0


def test_teacher_budget_point_is_calibrated_on_validation_not_test():
  """Validation rewards exiting at exit 0; test punishes it. The reported
  point follows validation's thresholds, whatever they cost on test."""
  from adaptive_vision import early_exit
  rng = np.random.default_rng(0)
  n, k = 200, 4
  labels = rng.integers(0, k, n)

  def logits(exit0_right: bool):
    first = rng.normal(0, 0.1, (n, k))
    first[np.arange(n), labels if exit0_right else (labels + 1) % k] += 6.0  # confident
    last = rng.normal(0, 0.1, (n, k))
    last[np.arange(n), labels] += 6.0
    return np.stack([first, last]).astype(np.float32)

  macs = np.array([1.0, 10.0])
  val = ExitLogits(logits(True), labels, macs)
  test = ExitLogits(logits(False), labels, macs)
  teacher = ExitLogits(logits(True)[1:], labels, np.array([20.0]))
  out = curves.teacher_budget_point(val, test, teacher, 0.5, gap_points=1.0)  # budget 10 MACs
  point = out["a_calibrated_on_val_within_budget"]
  want = early_exit.calibrate(val.exit_logits, labels, macs, max_mean_macs=10.0)
  expect = early_exit.evaluate_policy(test.exit_logits, labels, want, macs)
  assert point["accuracy"] == pytest.approx(float(expect["accuracy"]))
  assert point["accuracy"] < 0.2      # exit 0 is wrong on test; validation could not know
  assert out["teacher_final_accuracy"] == 1.0 and out["met"] is False
  assert curves.teacher_budget_point(val, test, teacher, 0.01, gap_points=1.0)[
      "a_calibrated_on_val_within_budget"] is None   # nothing fits 0.2 MACs
