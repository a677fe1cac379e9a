"""Paired differences over seeds: mean, spread and a 95% confidence interval (pure).

Seed s of one method against seed s of another (same initialisation, data
order and augmentation): the interval is Student's t over the per-seed
differences, mean +- t(0.975, n - 1) * std / sqrt(n). A difference is called
separated from zero only when its whole interval lies on one side; otherwise
it is a trend, however large its mean.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np


def t_quantile(n: int, level: float = 0.95) -> float:
  """The two-sided Student's t quantile for n values (n - 1 degrees of freedom)."""
  from scipy import stats as scipy_stats
  return float(scipy_stats.t.ppf(0.5 + level / 2, n - 1))


def paired(values: Sequence[float | None], level: float = 0.95) -> dict[str, Any]:
  """Summary of per-seed differences: n, mean, sample std, the interval and
  whether it lies above or below zero (None entries are left out and counted)."""
  vals = np.array([float(v) for v in values if v is not None])
  out: dict[str, Any] = {"values": [None if v is None else float(v) for v in values],
                         "n": int(vals.size), "missing": len(values) - int(vals.size)}
  if vals.size == 0:
    return dict(out, mean=None, std=None, ci=None, above_zero=False, below_zero=False)
  mean = float(vals.mean())
  if vals.size < 2:
    return dict(out, mean=mean, std=None, ci=None, above_zero=False, below_zero=False)
  std = float(vals.std(ddof=1))
  half = t_quantile(vals.size, level) * std / np.sqrt(vals.size)
  lo, hi = mean - half, mean + half
  return dict(out, mean=mean, std=std, ci=[float(lo), float(hi)], level=level,
              above_zero=bool(lo > 0), below_zero=bool(hi < 0))


def verdict(summary: dict, better: str, worse: str) -> str:
  """'better beats worse' only where the interval lies above zero, else a trend."""
  if summary.get("mean") is None:
    return "no data"
  ci = summary.get("ci")
  where = f"{100 * summary['mean']:+.2f} points"
  if ci:
    where += f", 95% CI [{100 * ci[0]:+.2f}, {100 * ci[1]:+.2f}] over {summary['n']} seeds"
  if summary.get("above_zero"):
    return f"{better} beats {worse} ({where})"
  if summary.get("below_zero"):
    return f"{worse} beats {better} ({where})"
  return f"trend only, not separated from zero ({where})"
