"""The study's selection metric, from validation logits only (PLAN.md).

  python results/ravit_cifar10_cpu/study/study_metric.py RUN_DIR [RUN_DIR ...]

For each run folder (holding val_logits.npz): per-exit accuracy on
validation, and the validation accuracy and mean MACs at entropy thresholds
calibrated on validation for mean MACs <= 0.55, 0.70 and 0.72 x the baseline
ViT's MACs (the selection metric is the 0.72 one).
"""

import json
import sys

import numpy as np

from adaptive_vision import early_exit
from adaptive_vision.eval import logits as logits_lib

BASELINE_MACS = 32294592.0  # configs/vit_cifar10.py, models.exit_macs


def metric(folder: str) -> dict:
  val = logits_lib.load_logits(f"{folder}/val_logits.npz")
  out = {"run": folder, "val_exit_accuracy": [
      round(100 * float(a), 2) for a in early_exit.per_exit_accuracy(val.exit_logits, val.labels)]}
  for budget in (0.55, 0.70, 0.72):
    try:
      t = early_exit.calibrate(val.exit_logits, val.labels, val.exit_macs,
                               max_mean_macs=budget * BASELINE_MACS)
    except ValueError as e:
      out[str(budget)] = str(e)
      continue
    r = early_exit.evaluate_policy(val.exit_logits, val.labels, t, val.exit_macs)
    out[str(budget)] = {"val_accuracy": round(100 * r["accuracy"], 2),
                        "mean_macs_fraction": round(r["mean_macs"] / BASELINE_MACS, 4)}
  return out


if __name__ == "__main__":
  for folder in sys.argv[1:]:
    print(json.dumps(metric(folder)))
