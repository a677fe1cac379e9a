r"""A training run's summary as Markdown + JSON (for results/).

  python -m launch.summarize --workdir runs/vit_cifar10 --out results/vit_cifar10_cpu \
      --command "python -m launch.train --config configs/vit_cifar10.py --workdir runs/vit_cifar10"

Reads the workdir's config.json and metrics.jsonl (written by launch.train):
test/val accuracy per exit, MACs per image, parameters, median training
images/s, wall time, and the machine it ran on.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys

from absl import app, flags

flags.DEFINE_string("workdir", None, "run directory")
flags.DEFINE_string("out", None, "output path without extension (.md and .json are written)")
flags.DEFINE_string("command", "", "the command that produced the run")
flags.DEFINE_string("note", "", "a free-text note for the Markdown")
FLAGS = flags.FLAGS


def machine() -> str:
  cpu = platform.processor() or "cpu"
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def summarize(workdir: str) -> dict:
  from adaptive_vision.train.metrics import read_metrics
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  info = (read_metrics(workdir, "info") or [{}])[0]
  train = read_metrics(workdir, "train")
  evals = read_metrics(workdir, "eval")
  final = read_metrics(workdir, "final")
  last_step = max((r["step"] for r in evals), default=0)
  out = {
      "workdir": workdir, "model": config["model"], "params": info.get("params"),
      "exit_macs": info.get("exit_macs"), "total_steps": info.get("total_steps"),
      "epochs": config.get("num_epochs"), "batch_size": config.get("batch_size"),
      "median_train_images_per_sec": statistics.median(
          [r["images_per_sec"] for r in train if r.get("images_per_sec")] or [0.0]),
      "train_seconds": final[-1]["train_seconds"] if final else None,
      "final_train_loss": train[-1]["loss"] if train else None,
      "machine": machine(),
  }
  for r in evals:
    if r["step"] == last_step:
      out[r["split"]] = {k: v for k, v in r.items() if k.startswith("accuracy")}
  return out


def markdown(s: dict, command: str, note: str) -> str:
  macs = s["exit_macs"] if isinstance(s["exit_macs"], list) else [s["exit_macs"]]
  lines = [f"# {os.path.basename(os.path.normpath(s['workdir']))}", "",
           f"Command: `{command}`" if command else "", "",
           f"Machine: {s['machine']}", "",
           "| metric | value |", "| --- | --- |"]
  for split in ("test", "val"):
    for k, v in sorted(s.get(split, {}).items()):
      lines.append(f"| {split} {k} | {100 * v:.2f}% |")
  lines += [f"| MACs per image (cumulative per exit) | {', '.join(f'{m / 1e6:.2f}M' for m in macs)} |",
            f"| parameters | {s['params']:,} |",
            f"| epochs x batch | {s['epochs']} x {s['batch_size']} ({s['total_steps']} steps) |",
            f"| median training images/s | {s['median_train_images_per_sec']:.1f} |",
            f"| training wall time | {s['train_seconds'] / 60:.1f} min |" if s["train_seconds"] else "",
            f"| final train loss | {s['final_train_loss']:.4f} |", ""]
  if note:
    lines += [note, ""]
  lines += ["Model config:", "", "```json", json.dumps(s["model"], indent=1), "```", ""]
  return "\n".join(l for l in lines if l is not None)


def main(argv):
  del argv
  s = summarize(FLAGS.workdir)
  s["command"] = FLAGS.command
  from adaptive_vision import atomic
  os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
  atomic.write_json(FLAGS.out + ".json", s, indent=1)
  atomic.write_text(FLAGS.out + ".md", markdown(s, FLAGS.command, FLAGS.note))
  print(f"wrote {FLAGS.out}.md and .json", file=sys.stderr)


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
