"""The results file: sections in, targets judged (configs/benchmarks.py), Markdown out.

    {"sections": {name: {command, machine, quick, settings, variants,
                         comparisons, figures, notes}},
     "targets": [{name, section, description, value, goal, met, summary}]}
"""

from __future__ import annotations

import json
import os
from typing import Optional

from adaptive_vision import atomic
from configs.benchmarks import TARGETS


def judge(results: dict) -> list[dict]:
  """Every target of configs/benchmarks.py against its section's figure."""
  out = []
  for name, section, goal, what in TARGETS:
    s = results["sections"].get(section) or {}
    value = s.get("figures", {}).get(name)
    met: Optional[bool] = None
    if value is None:
      summary = f"not measured: python -m benchmarks.run {section}"
    elif goal is None:
      summary = f"{value:.3f} (reported, no goal)"
    elif s.get("quick"):
      summary = f"{value:.3f} (--quick: not judged)"
    else:
      met = bool(value >= goal)
      summary = f"{value:.3f} vs {goal:g}: {'MET' if met else 'MISSED'}"
    out.append(dict(name=name, section=section, description=what, value=value, goal=goal,
                    met=met, summary=summary))
  return out


def write(path: str, name: str, section: dict) -> dict:
  """Puts `section` into the results file at `path` (other sections kept),
  judges the targets again and rewrites the Markdown beside it (.md)."""
  results = {"sections": {}}
  if os.path.exists(path):
    with open(path) as f:
      results = json.load(f)
  results["sections"][name] = section
  results["targets"] = judge(results)
  atomic.write_json(path, results, indent=1)
  atomic.write_text(os.path.splitext(path)[0] + ".md", markdown(results))
  return results


def _cell(x) -> str:
  if isinstance(x, float):
    return f"{x:.4g}"
  return "" if x is None else str(x)


def markdown(results: dict) -> str:
  lines = ["# CPU benchmarks", "",
           "Written by `python -m benchmarks.run` (docs/benchmarks.md); targets from "
           "configs/benchmarks.py. Speed-ups are medians over paired rounds of the "
           "baseline's time / the variant's time, [quartiles] beside them.", "",
           "## Targets", "", "| target | section | result | what |", "|---|---|---|---|"]
  lines += [f"| {t['name']} | {t['section']} | {t['summary']} | {t['description']} |"
            for t in results["targets"]]
  for name, s in results["sections"].items():
    m = s.get("machine", {})
    lines += ["", f"## {name}" + (" (--quick)" if s.get("quick") else ""), "",
              f"Command: `{s.get('command')}`.", "",
              f"Machine: {m.get('description')}; {', '.join(m.get('cpu_flags', []))}; "
              f"{m.get('cores_usable')} usable cores, load average {m.get('load_average')} at "
              f"the start; jax {m.get('jax')}, torch {m.get('torch')}.", "",
              "| comparison | speed-up | quartiles | MAC-predicted | realized / predicted | what |",
              "|---|---|---|---|---|---|"]
    for c, v in s.get("comparisons", {}).items():
      q = "[" + ", ".join(f"{x:.3f}" for x in v["quartiles"]) + "]"
      lines.append(f"| {c} | {v['median']:.3f} | {q} | {_cell(v.get('predicted'))} | "
                   f"{_cell(v.get('realized_over_predicted'))} | {v.get('what', '')} |")
    variants = s.get("variants", {})
    keys = [k for k in dict.fromkeys(k for v in variants.values() for k in v)
            if all(not isinstance(v.get(k), (list, dict)) for v in variants.values())]
    if variants:
      lines += ["", "| variant | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
      lines += [f"| {n} | " + " | ".join(_cell(v.get(k)) for k in keys) + " |"
                for n, v in variants.items()]
    figures = s.get("figures", {})
    if figures:
      lines += ["", "Figures: " + "; ".join(f"{k} {_cell(v)}" for k, v in figures.items()) + "."]
    lines += [""] + [f"- {n}" for n in s.get("notes", [])]
  return "\n".join(lines).rstrip() + "\n"
