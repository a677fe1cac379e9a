"""Accuracy-vs-MACs plots (matplotlib's Agg canvas: no display, no pyplot state)."""

from __future__ import annotations

import os
from typing import Any, Mapping

import numpy as np

from adaptive_vision import atomic


def plot_accuracy_vs_macs(path: str | os.PathLike, reports: Mapping[str, Mapping[str, Any]],
                          title: str = "Early-exit report") -> str:
  """PNG with one sweep curve per model, per-exit points, oracle and baseline(s)."""
  # Figure + Agg canvas directly: no pyplot global state, no display needed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(9.5, 5.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  colors = [f"C{i % 10}" for i in range(len(reports))]
  baselines: list[tuple[float, float]] = []
  for color, (name, r) in zip(colors, reports.items()):
    sweep = sorted(r["sweep"], key=lambda p: p["mean_macs"])
    ax.plot([p["mean_macs"] / 1e6 for p in sweep], [100 * p["accuracy"] for p in sweep],
            "-", color=color, lw=1.5, label=f"{name} (threshold sweep)")
    ax.plot([p["macs"] / 1e6 for p in r["per_exit"]],
            [100 * p["accuracy"] for p in r["per_exit"]],
            "s", color=color, ms=6, mfc="none", label=f"{name} exits alone")
    o = r["oracle"]
    ax.plot([o["mean_macs"] / 1e6], [100 * o["accuracy"]], "*", color=color, ms=13,
            mec="k", mew=0.5, label=f"{name} oracle")
    cal = [c for c in r.get("calibrated") or () if "error" not in c]
    if cal:
      ax.plot([c["test_mean_macs"] / 1e6 for c in cal],
              [100 * c["test_accuracy"] for c in cal],
              "X", color=color, ms=8, mec="k", mew=0.5, label=f"{name} calibrated on val")
    base = r.get("baseline") or {}
    if base.get("accuracy") is not None:
      key = (base["macs"], base["accuracy"])
      if not any(np.isclose(key, b).all() for b in baselines):
        baselines.append(key)
  for i, (m, a) in enumerate(baselines):
    ax.plot([m / 1e6], [100 * a], "D", color="k", ms=8,
            label="baseline" if i == 0 else None)
  ax.set_xlabel("mean MMACs per image")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  # Outside the axes: several models' markers would otherwise hide data.
  ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0))
  return atomic.save_figure(path, fig, dpi=120, bbox_inches="tight")


def plot_seed_study(path: str | os.PathLike, study: Mapping[str, Any], title: str) -> str:
  """Two panels, mean over seeds with a band of ± one standard deviation:
  the shared-threshold sweep (accuracy against mean MACs) and the calibrated
  budgets (accuracy against the budget), with the teacher's final exit."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(13, 5))
  FigureCanvasAgg(fig)
  left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  t = study["teacher"]
  for i, m in enumerate(study["methods"]):
    color = f"C{i % 10}"
    rows = sorted(study["shared_thresholds"][m], key=lambda r: r["mean_macs"]["mean"])
    x = np.array([r["mean_macs"]["mean"] for r in rows]) / 1e6
    y = 100 * np.array([r["accuracy"]["mean"] for r in rows])
    s = 100 * np.array([r["accuracy"]["std"] for r in rows])
    left.plot(x, y, "-", color=color, label=m)
    left.fill_between(x, y - s, y + s, color=color, alpha=0.2, lw=0)
    rows = [r for r in study["budgets"][m] if r["test_accuracy"]["mean"] is not None]
    x = np.array([100 * r["fraction"] for r in rows])
    y = 100 * np.array([r["test_accuracy"]["mean"] for r in rows])
    s = 100 * np.array([r["test_accuracy"]["std"] for r in rows])
    right.plot(x, y, "o-", color=color, label=m)
    right.fill_between(x, y - s, y + s, color=color, alpha=0.2, lw=0)
  for ax in (left, right):
    ax.axhline(100 * t["final_accuracy"], color="k", ls="--", lw=1, label="teacher final exit")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
  left.set_xlabel("mean MMACs per image")
  left.set_title("one shared entropy threshold, swept")
  right.set_xlabel("budget (% of the teacher's final-exit MACs)")
  right.set_title("per-exit thresholds calibrated on validation")
  n = len(study["seeds"])
  fig.suptitle(f"{title} (mean ± std over {n} seeds)" if n > 1 else f"{title} (one seed)")
  return atomic.save_figure(path, fig, dpi=110, bbox_inches="tight")


def plot_paired_differences(path: str | os.PathLike, study: Mapping[str, Any],
                            title: str) -> str:
  """The paired per-seed differences reference - other (points), mean with a
  band of ± one standard deviation over seeds, against zero: the shared
  thresholds (placed at the reference's mean MACs) and the calibrated budgets.
  A band that straddles zero is a difference the seeds do not separate."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  ref = study["claims"]["reference"]
  fig = Figure(figsize=(13, 5))
  FigureCanvasAgg(fig)
  left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  ref_macs = [r["mean_macs"]["mean"] for r in study["shared_thresholds"][ref]]
  others = [m for m in study["methods"] if m != ref]
  for other in others:
    color = f"C{study['methods'].index(other) % 10}"
    d = study["paired"][f"{ref}-{other}"]
    for ax, rows, xs, style in (
        (left, d["shared_thresholds"], np.asarray(ref_macs) / 1e6, "-"),
        (right, d["budgets"], [100 * r["fraction"] for r in d["budgets"]], "o-")):
      keep = [j for j, r in enumerate(rows) if r["difference"]["mean"] is not None]
      order = sorted(keep, key=lambda j: xs[j])
      x = np.array([xs[j] for j in order])
      y = 100 * np.array([rows[j]["difference"]["mean"] for j in order])
      s = 100 * np.array([rows[j]["difference"]["std"] or 0.0 for j in order])
      ax.plot(x, y, style, color=color, label=f"{ref} - {other}")
      ax.fill_between(x, y - s, y + s, color=color, alpha=0.2, lw=0)
  for ax in (left, right):
    ax.axhline(0.0, color="k", lw=1)
    ax.set_ylabel("paired difference (accuracy points, test)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
  left.set_xlabel(f"mean MMACs per image ({ref})")
  left.set_title("one shared entropy threshold, swept")
  right.set_xlabel("budget (% of the teacher's final-exit MACs)")
  right.set_title("per-exit thresholds calibrated on validation")
  n = len(study["seeds"])
  fig.suptitle(f"{title}: paired differences (mean ± std over {n} seeds)" if n > 1
               else f"{title}: paired differences (one seed)")
  return atomic.save_figure(path, fig, dpi=110, bbox_inches="tight")
