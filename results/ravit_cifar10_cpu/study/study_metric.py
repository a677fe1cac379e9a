"""The study's selection metric, from validation logits only (PLAN.md).

  python results/ravit_cifar10_cpu/study/study_metric.py RUN_DIR [RUN_DIR ...]
  python results/ravit_cifar10_cpu/study/study_metric.py --choose RUN_DIR [RUN_DIR ...]
  python results/ravit_cifar10_cpu/study/study_metric.py --exit_rule SEED_DIR [SEED_DIR ...]

--choose prints only the folder the rule picks: the highest validation
accuracy at <= 0.72x; candidates within 0.2 points of the best are ties,
broken by the lower validation mean MACs.

--exit_rule prints the exit rule (entropy or max_prob) with the higher
validation accuracy at <= 0.72x, averaged over the seed folders given (the
PLAN.md addendum; entropy wins a tie).

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


def metric(folder: str, criterion: str = "entropy") -> dict:
  val = logits_lib.load_logits(f"{folder}/val_logits.npz")
  out = {"run": folder, "val_exit_accuracy": [
      round(100 * float(a), 2) for a in early_exit.per_exit_accuracy(val.exit_logits, val.labels)]}
  for budget in (0.55, 0.70, 0.72):
    try:
      t = early_exit.calibrate(val.exit_logits, val.labels, val.exit_macs, criterion=criterion,
                               max_mean_macs=budget * BASELINE_MACS)
    except ValueError as e:
      out[str(budget)] = str(e)
      continue
    r = early_exit.evaluate_policy(val.exit_logits, val.labels, t, val.exit_macs, criterion)
    out[str(budget)] = {"val_accuracy": round(100 * r["accuracy"], 2),
                        "mean_macs_fraction": round(r["mean_macs"] / BASELINE_MACS, 4)}
  return out


TIE_POINTS = 0.2


def choose(results: list[dict]) -> str:
  """The rule of PLAN.md over `metric` results: the run folder it picks."""
  ok = [r for r in results if isinstance(r.get("0.72"), dict)]
  if not ok:
    raise ValueError("no candidate reaches <= 0.72x the baseline's MACs")
  best = max(r["0.72"]["val_accuracy"] for r in ok)
  tied = [r for r in ok if r["0.72"]["val_accuracy"] >= best - TIE_POINTS]
  return min(tied, key=lambda r: r["0.72"]["mean_macs_fraction"])["run"]


def exit_rule(folders: list[str]) -> tuple[str, dict]:
  """The addendum's rule: (the rule, seed-mean validation accuracy at <= 0.72x per rule)."""
  means = {c: float(np.mean([metric(f, c)["0.72"]["val_accuracy"] for f in folders]))
           for c in ("entropy", "max_prob")}
  return ("max_prob" if means["max_prob"] > means["entropy"] else "entropy"), means


if __name__ == "__main__":
  args = sys.argv[1:]
  if args and args[0] == "--exit_rule":
    rule, means = exit_rule(args[1:])
    print(rule)
    print(json.dumps(means), file=sys.stderr)
  elif args and args[0] == "--choose":
    print(choose([metric(folder) for folder in args[1:]]))
  else:
    for folder in args:
      print(json.dumps(metric(folder)))
