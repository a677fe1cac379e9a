"""Curve comparison: interpolation and matched-compute comparison by hand."""

import numpy as np
import pytest

from adaptive_vision import curves
from adaptive_vision.reporting import ExitLogits


def test_accuracy_at_macs_interpolates_and_keeps_best_duplicate():
  pts = [dict(mean_macs=1.0, accuracy=0.5), dict(mean_macs=3.0, accuracy=0.9),
         dict(mean_macs=1.0, accuracy=0.6)]
  np.testing.assert_allclose(curves.accuracy_at_macs(pts, np.array([1.0, 2.0, 3.0])),
                             [0.6, 0.75, 0.9])
  assert curves.best_accuracy_within(pts, 2.0)["accuracy"] == 0.6
  assert curves.best_accuracy_within(pts, 0.5) is None


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
