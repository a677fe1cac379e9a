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
  return _finish(path, fig, ax, "mean MMACs per image", title)


def _finish(path, fig, ax, xlabel: str, title: str) -> str:
  """Labels, grid and the legend beside an accuracy-vs-compute axes; saves it."""
  ax.set_xlabel(xlabel)
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


def plot_claim_table(path: str | os.PathLike, table: Mapping[str, Any], title: str) -> str:
  """The cascade's accuracy against its MACs (fraction of the baseline's), with
  thresholds calibrated on each seed's validation split and read on test: one
  thin line per seed, the seed mean with a ± one standard deviation band; the
  baseline per seed and its mean (band ± std); the claims as targets."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(8.5, 5.2))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  rows = table["rows"]
  for i, r in enumerate(rows):
    c = r.get("curve") or []
    ax.plot([p["test_macs_fraction"] for p in c], [100 * p["test_accuracy"] for p in c], "-",
            color="C0", lw=0.8, alpha=0.45, label="cascade, each seed" if i == 0 else None)
  shared = sorted(set.intersection(*(
      {p["budget"] for p in r.get("curve") or []} for r in rows))) if rows else []
  if shared:
    at = lambda r, b: next(p for p in r["curve"] if p["budget"] == b)  # noqa: E731
    x = np.array([[at(r, b)["test_macs_fraction"] for b in shared] for r in rows]).mean(0)
    acc = 100 * np.array([[at(r, b)["test_accuracy"] for b in shared] for r in rows])
    mean, std = acc.mean(0), (acc.std(0, ddof=1) if len(rows) > 1 else np.zeros(len(shared)))
    ax.plot(x, mean, "-", color="C0", lw=2, label=f"cascade, mean of {len(rows)} seeds")
    ax.fill_between(x, mean - std, mean + std, color="C0", alpha=0.18, lw=0)
  base = [100 * r["baseline_test"] for r in rows]
  bmean = float(np.mean(base))
  bstd = float(np.std(base, ddof=1)) if len(base) > 1 else 0.0
  ax.axhspan(bmean - bstd, bmean + bstd, color="k", alpha=0.08, lw=0)
  ax.axhline(bmean, color="k", ls="--", lw=1, label=f"baseline, mean ({bmean:.2f}%)")
  ax.plot([1.0] * len(base), base, "D", color="k", ms=5, label="baseline, each seed")
  for j, b in enumerate(table["summary"]["budgets"]):
    a, m = b["test_accuracy"], b["test_macs_fraction"]
    if a["mean"] is None:
      continue
    ax.errorbar([m["mean"]], [100 * a["mean"]], yerr=[100 * (a["std"] or 0)],
                fmt="X", color="C1", ms=8, mec="k", mew=0.5, capsize=3,
                label="calibrated budgets, mean ± std" if j == 0 else None)
  for c in table.get("claims") or ():
    target = 100 * c["baseline_mean"] - c["points"]
    ax.plot([c["budget"]], [target], "v", color="C3" if not c["met"] else "C2", ms=9,
            label=f"{c['label']}: >= baseline - {c['points']:g} at <= {c['budget']:g}x "
                  f"({'met' if c['met'] else 'missed'})")
  return _finish(path, fig, ax, "mean MACs per image, fraction of the baseline's (test)", title)
