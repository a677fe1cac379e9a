"""Tests of adaptive_vision.reporting: npz files, reports, Markdown and plot."""
import json
import math
import os

import matplotlib.image
import numpy as np
import pytest

from adaptive_vision import early_exit, reporting

LN3 = math.log(3.0)
LABELS = np.array([0, 0, 1, 1])
EXIT0 = np.array([[20.0, 0.0], [LN3, 0.0], [0.0, 0.0], [20.0, 0.0]], np.float32)
EXIT1 = np.array([[0.0, 20.0], [20.0, 0.0], [0.0, 20.0], [0.0, 20.0]], np.float32)
MACS = [1e6, 3e6]


def two_exit(exit0=EXIT0):
  return reporting.ExitLogits(np.stack([exit0, EXIT1]), LABELS, MACS)


def baseline():
  # Single exit, 75 % accurate, 3 MMACs.
  return reporting.ExitLogits(EXIT1[None], LABELS, [3e6])


def test_roundtrip(tmp_path):
  path = reporting.save_logits(tmp_path / 'sub' / 'test_logits.npz', [EXIT0, EXIT1],
                               LABELS.astype(np.int32), MACS)
  assert os.path.basename(path) == 'test_logits.npz'
  with np.load(path) as z:
    assert z['exit_logits'].dtype == np.float32 and z['exit_logits'].shape == (2, 4, 2)
    assert np.issubdtype(z['labels'].dtype, np.integer)
  got = reporting.load_logits(path)
  np.testing.assert_array_equal(got.exit_logits, np.stack([EXIT0, EXIT1]))
  np.testing.assert_array_equal(got.labels, LABELS)
  np.testing.assert_array_equal(got.exit_macs, MACS)
  assert (got.num_exits, got.num_examples, got.num_classes) == (2, 4, 2)


def test_load_validation(tmp_path):
  bad = tmp_path / 'bad.npz'
  np.savez(bad, exit_logits=np.zeros((2, 4, 3), np.float32), labels=np.zeros(5, int),
           exit_macs=np.ones(2))
  with pytest.raises(ValueError, match=r'bad\.npz.*labels has shape \(5,\)'):
    reporting.load_logits(bad)
  missing = tmp_path / 'missing.npz'
  np.savez(missing, exit_logits=np.zeros((2, 4, 3), np.float32), labels=np.zeros(4, int))
  with pytest.raises(ValueError, match="lacks \\['exit_macs'\\]"):
    reporting.load_logits(missing)
  with pytest.raises(ValueError, match='exit_macs has 3 entries for 2 exits'):
    reporting.ExitLogits(np.zeros((2, 4, 3)), np.zeros(4, int), [1, 2, 3])
  with pytest.raises(ValueError, match='non-decreasing'):
    reporting.ExitLogits(np.zeros((2, 4, 3)), np.zeros(4, int), [2, 1])


def test_report_by_hand():
  r = reporting.early_exit_report(two_exit(), baseline=baseline(), name='ee')
  json.dumps(r, allow_nan=False)  # strict JSON
  assert [p['accuracy'] for p in r['per_exit']] == [0.5, 0.75]
  assert [p['macs'] for p in r['per_exit']] == MACS
  sweep = r['sweep']
  assert (sweep[0]['accuracy'], sweep[0]['mean_macs']) == pytest.approx((0.5, 1e6))
  assert (sweep[-1]['accuracy'], sweep[-1]['mean_macs']) == pytest.approx((0.75, 3e6))
  assert sweep[-1]['relative_macs'] == pytest.approx(1.0)
  o = r['oracle']
  assert (o['accuracy'], o['mean_macs']) == pytest.approx((1.0, 2e6))
  assert o['exit_fractions'] == pytest.approx([0.5, 0.5])
  b = r['baseline']
  assert (b['accuracy'], b['macs']) == pytest.approx((0.75, 3e6))
  # Cheapest sweep point with accuracy >= 74.5 %: ex0, ex1, ex3 exit early -> 1.5 MMACs.
  assert b['macs_at_target'] == pytest.approx(1.5e6)
  assert b['relative_macs_at_target'] == pytest.approx(0.5)
  assert r['calibrated'] == []


def test_report_never_reaching_baseline():
  perfect = np.array([[20.0, 0.0], [20.0, 0.0], [0.0, 20.0], [0.0, 20.0]], np.float32)
  strong = reporting.ExitLogits(perfect[None], LABELS, [5e6])  # 100 %: curve tops at 75 %
  r = reporting.early_exit_report(two_exit(), baseline=strong)
  assert r['baseline']['accuracy'] == 1.0
  assert r['baseline']['macs_at_target'] is None


def test_calibrated_points_use_val_only(monkeypatch):
  # On test, ex1's exit 0 is wrong, so test-tuned thresholds would differ.
  test0 = EXIT0.copy()
  test0[1] = [0.0, LN3]
  test, val = two_exit(test0), two_exit()
  seen = []
  real = early_exit.calibrate

  def spy(logits, labels, macs, **kw):
    seen.append(np.array(logits))
    return real(logits, labels, macs, **kw)

  monkeypatch.setattr(early_exit, 'calibrate', spy)
  r = reporting.early_exit_report(test, val=val, baseline=baseline(), baseline_val=baseline(),
                                  budgets=[0.8, 0.1])
  assert seen and all(np.array_equal(x, val.exit_logits) for x in seen)
  cal = {c['target']: c for c in r['calibrated']}
  acc_pt = cal['val accuracy >= baseline val accuracy - 0.5 pts']
  # On val: min MACs with acc >= 74.5 % exits ex0, ex1, ex3 (1.5 MMACs).
  assert acc_pt['val_mean_macs'] == pytest.approx(1.5e6)
  expected = early_exit.evaluate_policy(test.exit_logits, LABELS, acc_pt['thresholds'], MACS)
  assert acc_pt['test_accuracy'] == pytest.approx(expected['accuracy']) == pytest.approx(0.5)
  assert acc_pt['test_mean_macs'] == pytest.approx(1.5e6)
  budget = cal["mean MACs <= 80% of the baseline's MACs"]
  assert budget['val_mean_macs'] <= 0.8 * 3e6
  assert 'lowest achievable' in cal["mean MACs <= 10% of the baseline's MACs"]['error']
  assert 'val accuracy >= last-exit val accuracy - 0.5 pts' in cal
  json.dumps(r, allow_nan=False)


def test_write_report(tmp_path):
  rng = np.random.default_rng(0)
  n, k = 120, 5
  labels = rng.integers(0, k, n)
  reports = {}
  for name, boost in (('ce', 1.0), ('erde', 1.5)):
    logits = rng.normal(size=(3, n, k)).astype(np.float32)
    for e in range(3):
      logits[e, np.arange(n), labels] += boost * (e + 1) * rng.random(n)
    data = reporting.ExitLogits(logits, labels, [2e6, 5e6, 9e6])
    base = reporting.ExitLogits(logits[-1:], labels, [9e6])
    reports[name] = reporting.early_exit_report(data, val=data, baseline=base,
                                                budgets=[0.5], num_points=12, name=name)
  paths = reporting.write_report(tmp_path / 'out', reports, title='students')
  assert sorted(os.listdir(tmp_path / 'out')) == ['accuracy_vs_macs.png', 'report.json',
                                                  'report.md']
  with open(paths['json']) as f:
    loaded = json.load(f)
  assert loaded['title'] == 'students' and set(loaded['reports']) == {'ce', 'erde'}
  md = open(paths['markdown']).read()
  assert '| threshold | accuracy (%) | mean MMACs | % of baseline MACs | exit fractions |' in md
  assert '| exit | accuracy (%) | cumulative MMACs |' in md
  assert '## ce' in md and '## erde' in md and '**Oracle**' in md and '**Baseline:**' in md
  assert os.path.getsize(paths['plot']) > 1000
  img = matplotlib.image.imread(paths['plot'])
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100
