"""launch.evaluate recomputes the logits of a checkpoint; launch.report writes the report."""

import os
import subprocess
import sys

import numpy as np

from adaptive_vision import reporting
from adaptive_vision.train import loop
from test_train import tiny_config  # tests/ is on sys.path under pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_recomputes_logits_and_report_writes_files(tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config(total_steps=4), workdir)
  saved = reporting.load_logits(os.path.join(workdir, "test_logits.npz"))
  os.remove(os.path.join(workdir, "test_logits.npz"))

  from launch import evaluate
  evaluate.compute_logits(tiny_config(total_steps=4), workdir)
  again = reporting.load_logits(os.path.join(workdir, "test_logits.npz"))
  np.testing.assert_allclose(again.exit_logits, saved.exit_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(again.labels, saved.labels)

  out = str(tmp_path / "report")
  proc = subprocess.run(
      [sys.executable, "-m", "launch.report", f"--run=tiny={workdir}", f"--baseline={workdir}",
       f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in ("report.json", "report.md", "accuracy_vs_macs.png", "tiny_test_logits.npz",
               "baseline_val_logits.npz"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
