"""The cascade-vs-baseline claim table: thresholds from validation only, paired
differences per seed with their interval, and the claims."""

import numpy as np
import pytest

from adaptive_vision.eval import cascade_seeds, intervals
from adaptive_vision.eval.logits import ExitLogits


def _logits(rng, n, correct_rate, exits, macs):
  """Exit logits whose exit e is right on about correct_rate[e] of n images."""
  labels = rng.integers(0, 10, n)
  out = []
  for rate in correct_rate[:exits]:
    z = rng.normal(size=(n, 10))
    right = rng.random(n) < rate
    z[np.arange(n), np.where(right, labels, (labels + 1) % 10)] += 4.0
    out.append(z)
  return ExitLogits(np.stack(out).astype(np.float32), labels, np.asarray(macs, np.float64))


def test_intervals():
  s = intervals.paired([0.02, 0.025, 0.03])
  assert s["mean"] == pytest.approx(0.025) and s["std"] == pytest.approx(0.005)
  half = 4.302653 * 0.005 / np.sqrt(3)  # t(0.975, 2)
  assert s["ci"] == pytest.approx([0.025 - half, 0.025 + half], rel=1e-5)
  assert s["above_zero"] and not s["below_zero"]
  wide = intervals.paired([0.01, -0.005, 0.02])
  assert not wide["above_zero"] and "trend only" in intervals.verdict(wide, "a", "b")
  assert "a beats b" in intervals.verdict(s, "a", "b")
  assert intervals.paired([0.01])["ci"] is None


def test_claim_table_calibrates_on_validation_and_pairs_seeds():
  rng = np.random.default_rng(0)
  macs = [10.0, 30.0]
  cascade, baseline = [], []
  for s in range(3):
    cascade.append((_logits(rng, 400, (0.6, 0.8), 2, macs), _logits(rng, 400, (0.6, 0.8), 2, macs)))
    baseline.append((_logits(rng, 400, (0.82,), 1, [40.0]), _logits(rng, 400, (0.82,), 1, [40.0])))
  t = cascade_seeds.claim_table(cascade, baseline, [0, 1, 2], budgets=(0.5, 0.8),
                                claims=[(0.8, 5.0, "loose"), (0.5, 0.0, "tight")])
  for row, (c, b) in zip(t["rows"], zip(cascade, baseline)):
    assert row["baseline_test"] == pytest.approx(np.mean(b[1].exit_logits[0].argmax(-1)
                                                         == b[1].labels))
    for point in row["budgets"]:
      assert point["test_macs_fraction"] <= point["budget"] + 0.1  # calibrated on val, not test
      assert point["difference"] == pytest.approx(point["test_accuracy"] - row["baseline_test"])
  full = t["summary"]["budgets"][1]
  assert full["difference"]["n"] == 3 and len(full["difference"]["ci"]) == 2
  loose, tight = t["claims"]
  assert loose["met"] and not tight["met"]
  assert loose["gap_points"] == pytest.approx(
      100 * (t["summary"]["baseline_test"]["mean"] - full["test_accuracy"]["mean"]))
  md = cascade_seeds.markdown(t, "title")
  assert "| mean ± std |" in md and "**met**" in md and "**missed**" in md
  with pytest.raises(ValueError, match="one cascade and one baseline run per seed"):
    cascade_seeds.claim_table(cascade[:2], baseline, [0, 1, 2])


def test_the_curve_is_the_same_calibration_over_a_grid_and_is_plotted(tmp_path):
  from adaptive_vision.eval import files
  from adaptive_vision.eval.logits import save_logits
  rng = np.random.default_rng(1)
  macs = [10.0, 30.0]
  for s in range(2):
    for who, rates, m in (("ravit", (0.6, 0.8), macs), ("vit", (0.82,), [40.0])):
      for split in ("val", "test"):
        x = _logits(rng, 300, rates, len(m), m)
        save_logits(tmp_path / f"{who}_s{s}" / f"{split}_logits.npz", x.exit_logits, x.labels,
                    x.exit_macs)
  t = files.cascade_seed_report(str(tmp_path / "out"), "ravit", str(tmp_path / "ravit_s{seed}"),
                                str(tmp_path / "vit_s{seed}"), [0, 1], budgets=(0.5, 0.8),
                                claims=[(0.8, 5.0, "loose")])
  for row in t["rows"]:
    curve = {p["budget"]: p for p in row["curve"]}
    assert min(curve) >= 0.25  # below the first exit (10 of 40 MACs) nothing is feasible
    for point in row["budgets"]:  # the grid holds the table's budgets: same numbers
      assert curve[point["budget"]]["test_accuracy"] == point["test_accuracy"]
      assert curve[point["budget"]]["test_macs_fraction"] == point["test_macs_fraction"]
  png = (tmp_path / "out" / "claim_table.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_the_exit_rule_is_a_choice_of_the_table_and_of_the_export():
  from adaptive_vision import early_exit, export
  rng = np.random.default_rng(2)
  macs = [10.0, 30.0]
  cascade = [(_logits(rng, 300, (0.6, 0.8), 2, macs), _logits(rng, 300, (0.6, 0.8), 2, macs))]
  baseline = [(_logits(rng, 300, (0.82,), 1, [40.0]), _logits(rng, 300, (0.82,), 1, [40.0]))]
  tables = {c: cascade_seeds.claim_table(cascade, baseline, [0], budgets=(0.6,), criterion=c)
            for c in early_exit.CRITERIA}
  for c, t in tables.items():
    (point,) = t["rows"][0]["budgets"]
    val, test = cascade[0]
    want = early_exit.evaluate_policy(
        test.exit_logits, test.labels,
        early_exit.calibrate(val.exit_logits, val.labels, val.exit_macs, criterion=c,
                             max_mean_macs=0.6 * 40.0), test.exit_macs, c)
    assert point["test_accuracy"] == pytest.approx(want["accuracy"]), c
    assert t["criterion"] == c and f"per-exit {c} thresholds" in cascade_seeds.markdown(t, "x")
  (p,) = export.calibration(cascade[0][0].exit_logits, cascade[0][0].labels, macs, [0.6],
                            reference_macs=40.0, reference="b", criterion="max_prob")["budgets"]
  assert 0.0 <= p["thresholds"][0] <= 1.0  # a probability, not an entropy
