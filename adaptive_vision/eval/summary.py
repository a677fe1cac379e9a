"""A training run's summary from its workdir (config.json, metrics.jsonl):
accuracy per exit, MACs, parameters, median images/s, training time, and the
machines that trained it (one 'machine' record per process start; runs that
predate those records name only the machine that wrote the summary)."""

from __future__ import annotations

import json
import os
import statistics

from adaptive_vision import machine


def _records(workdir: str) -> dict[str, list[dict]]:
  """metrics.jsonl (one JSON record per line, each with a 'kind') by kind."""
  path, out = os.path.join(workdir, "metrics.jsonl"), {}
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        if line.strip():
          record = json.loads(line)
          out.setdefault(record.get("kind"), []).append(record)
  return out


def throughput_seconds(train: list[dict], batch_size: int) -> float | None:
  """Training time implied by the logged images/s: each train record covers the
  steps since the previous one. Unlike a process's wall clock it spans every
  resumed segment of a run (compilation and checkpoint pauses left out)."""
  total, prev = 0.0, 0
  for r in sorted(train, key=lambda r: r["step"]):
    if r.get("images_per_sec"):
      total += (r["step"] - prev) * batch_size / r["images_per_sec"]
    prev = r["step"]
  return total or None


def machines(records: list[dict]) -> list[dict]:
  """[{'from_step', 'machine', 'device_kind'}] in step order, a machine listed
  again only when it differs from the one before (a restart on the same one)."""
  out = []
  for r in sorted(records, key=lambda r: r["step"]):
    entry = {"from_step": r["step"], "machine": r.get("machine"),
             "device_kind": r.get("device_kind")}
    if not out or (out[-1]["machine"], out[-1]["device_kind"]) != (entry["machine"],
                                                                    entry["device_kind"]):
      out.append(entry)
  return out


def summarize(workdir: str) -> dict:
  with open(os.path.join(workdir, "config.json")) as f:
    config = json.load(f)
  records = _records(workdir)
  info = (records.get("info") or [{}])[0]
  train, evals, final = (records.get(k, []) for k in ("train", "eval", "final"))
  last_step = max((r["step"] for r in evals), default=0)
  out = {
      "workdir": workdir, "model": config["model"], "params": info.get("params"),
      "exit_macs": info.get("exit_macs"), "total_steps": info.get("total_steps"),
      "epochs": config.get("num_epochs"), "batch_size": config.get("batch_size"),
      "median_train_images_per_sec": statistics.median(
          [r["images_per_sec"] for r in train if r.get("images_per_sec")] or [0.0]),
      "train_seconds": final[-1]["train_seconds"] if final else None,
      # None: written before runs recorded it (resumed or not, unknown).
      "final_segment_start_step": final[-1].get("start_step") if final else None,
      "train_seconds_from_throughput": throughput_seconds(train, config.get("batch_size") or 0),
      "final_train_loss": train[-1]["loss"] if train else None,
      "trained_on": machines(records.get("machine", [])),
      "summarized_on": machine.describe(),
  }
  for r in evals:
    if r["step"] == last_step:
      out[r["split"]] = {k: v for k, v in r.items() if k.startswith("accuracy")}
  return out
