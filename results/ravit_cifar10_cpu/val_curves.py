"""Validation accuracy during training, from the committed metrics.jsonl files.

  python results/ravit_cifar10_cpu/val_curves.py NAME=METRICS_JSONL [NAME=...]

Prints a Markdown table: one row per evaluation step (every 2 epochs here),
one column per run, the last exit's validation accuracy (%).
"""

import json
import sys


def curve(path: str) -> dict[int, float]:
  out = {}
  for line in open(path):
    r = json.loads(line)
    if r.get("kind") == "eval" and r.get("split") == "val":
      out[int(r["step"])] = 100 * float(r["accuracy"])  # the last exit's
  return out


if __name__ == "__main__":
  runs = dict(arg.split("=", 1) for arg in sys.argv[1:])
  curves = {name: curve(path) for name, path in runs.items()}
  steps = sorted(set().union(*curves.values()))
  print("| step | " + " | ".join(curves) + " |")
  print("|---:|" + "---:|" * len(curves))
  for s in steps:
    print(f"| {s} | " + " | ".join(f"{c[s]:.2f}" if s in c else "" for c in curves.values()) + " |")
