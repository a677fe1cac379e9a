"""Logits files, early-exit reports (JSON / Markdown) and accuracy-vs-MACs plots.

This is an edge module: it reads and writes files. It depends only on arrays,
dicts and `adaptive_vision.early_exit` (no model or training imports).

Logits file contract (docs/design.md): ``<split>_logits.npz`` with
``exit_logits`` float32 [E, N, K], ``labels`` int [N], ``exit_macs`` float [E]
(cumulative MACs per image).

Accuracies in reports are fractions in [0, 1]; tables and plots show percent.
MACs are per image; tables and plots show MMACs (1e6 MACs).
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from adaptive_vision import atomic, early_exit

REPORT_JSON = 'report.json'
REPORT_MD = 'report.md'
REPORT_PNG = 'accuracy_vs_macs.png'
# "Matches the baseline" means within this many accuracy points (fraction 0.005).
ACCURACY_TOLERANCE = 0.005


# --------------------------------------------------------------------------
# Logits files
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ExitLogits:
  """Validated per-exit logits of one split.

  Attributes:
    exit_logits: float32 [E, N, K] (a [N, K] input is taken as one exit).
    labels: int64 [N].
    exit_macs: float64 [E], cumulative MACs per image, non-decreasing.
  """
  exit_logits: np.ndarray
  labels: np.ndarray
  exit_macs: np.ndarray

  def __post_init__(self):
    logits = np.asarray(self.exit_logits, dtype=np.float32)
    if logits.ndim == 2:
      logits = logits[None]
    if logits.ndim != 3:
      raise ValueError(f'exit_logits must be [E, N, K], got shape {logits.shape}')
    num_exits, n, _ = logits.shape
    labels = np.asarray(self.labels)
    if labels.shape != (n,):
      raise ValueError(f'labels has shape {labels.shape} but exit_logits {logits.shape} '
                       f'holds N={n} examples')
    if n and not np.issubdtype(labels.dtype, np.integer):
      raise ValueError(f'labels must be integers, got dtype {labels.dtype}')
    macs = np.asarray(self.exit_macs, dtype=np.float64).reshape(-1)
    if macs.shape != (num_exits,):
      raise ValueError(f'exit_macs has {macs.size} entries for {num_exits} exits')
    if np.any(np.diff(macs) < 0):
      raise ValueError(f'exit_macs must be non-decreasing (cumulative), got {macs.tolist()}')
    object.__setattr__(self, 'exit_logits', logits)
    object.__setattr__(self, 'labels', labels.astype(np.int64))
    object.__setattr__(self, 'exit_macs', macs)

  @property
  def num_exits(self) -> int:
    return self.exit_logits.shape[0]

  @property
  def num_examples(self) -> int:
    return self.exit_logits.shape[1]

  @property
  def num_classes(self) -> int:
    return self.exit_logits.shape[2]


_KEYS = ('exit_logits', 'labels', 'exit_macs')


def save_logits(path: str | os.PathLike, exit_logits: Any, labels: Any,
                exit_macs: Any) -> str:
  """Write the logits npz of the contract (validated); returns the path."""
  if isinstance(exit_logits, (list, tuple)):
    exit_logits = np.stack([np.asarray(x) for x in exit_logits])
  data = ExitLogits(exit_logits, labels, exit_macs)
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  return atomic.save_npz(path, exit_logits=data.exit_logits, labels=data.labels,
                         exit_macs=data.exit_macs)


def load_logits(path: str | os.PathLike) -> ExitLogits:
  """Read and validate a logits npz."""
  with np.load(os.fspath(path)) as z:
    missing = [k for k in _KEYS if k not in z.files]
    if missing:
      raise ValueError(f'{os.fspath(path)} lacks {missing}; a logits file holds '
                       f'{list(_KEYS)} (found {z.files})')
    try:
      return ExitLogits(z['exit_logits'], z['labels'], z['exit_macs'])
    except ValueError as e:
      raise ValueError(f'{os.fspath(path)}: {e}') from None


def _as_logits(x: Any) -> ExitLogits:
  if isinstance(x, ExitLogits):
    return x
  if isinstance(x, (str, os.PathLike)):
    return load_logits(x)
  raise TypeError(f'expected ExitLogits or a path to a logits npz, got {type(x)}')


# --------------------------------------------------------------------------
# Report (pure: arrays in, JSON-serialisable dict out)
# --------------------------------------------------------------------------


def _jsonable(x: Any) -> Any:
  """Numpy -> python; non-finite floats -> None (strict JSON)."""
  if isinstance(x, Mapping):
    return {str(k): _jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_jsonable(v) for v in x]
  if isinstance(x, np.ndarray):
    return _jsonable(x.tolist())
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (float, np.floating)):
    return float(x) if math.isfinite(x) else None
  if isinstance(x, np.bool_):
    return bool(x)
  return x


def _check_same_model(a: ExitLogits, b: ExitLogits, what: str) -> None:
  if a.num_exits != b.num_exits or a.num_classes != b.num_classes:
    raise ValueError(f'{what}: {a.num_exits} exits x {a.num_classes} classes vs '
                     f'{b.num_exits} exits x {b.num_classes} classes')
  if not np.allclose(a.exit_macs, b.exit_macs, rtol=1e-6):
    raise ValueError(f'{what}: exit_macs differ ({a.exit_macs.tolist()} vs '
                     f'{b.exit_macs.tolist()})')


def _single_exit(x: ExitLogits) -> tuple[float, float]:
  """(accuracy, MACs) of the last exit (a baseline is a single-exit model)."""
  acc = float(np.mean(np.argmax(x.exit_logits[-1], axis=-1) == x.labels))
  return acc, float(x.exit_macs[-1])


def early_exit_report(test: Any, *, val: Any = None, baseline: Any = None,
                      baseline_val: Any = None, budgets: Sequence[float] | None = None,
                      criterion: str = 'entropy', num_points: int = 50,
                      name: str = 'model') -> dict[str, Any]:
  """Early-exit report of one model (JSON-serialisable dict).

  Args:
    test: test-split `ExitLogits` (or a path to an npz).
    val: validation `ExitLogits` of the same model; enables calibrated points
      (thresholds chosen on val only, then evaluated on test).
    baseline: single-exit test `ExitLogits` (if it has several exits, its last
      exit is used); adds its accuracy / MACs, the sweep's MACs relative to it
      and the lowest sweep MACs reaching baseline accuracy - 0.5 points.
    baseline_val: the baseline's val logits; adds the calibrated point
      "val accuracy >= baseline val accuracy - 0.5 points".
    budgets: MAC budgets as fractions of the baseline's MACs (of the last
      exit's MACs without a baseline); one calibrated point each.
    criterion: 'entropy' or 'max_prob'.
    num_points: sweep size.

  Calibrated points always include "val accuracy >= last exit's val accuracy
  - 0.5 points". Infeasible targets are recorded with an 'error' message.
  """
  test = _as_logits(test)
  args = (test.exit_logits, test.labels, test.exit_macs)
  per_exit_acc = early_exit.per_exit_accuracy(test.exit_logits, test.labels)
  report: dict[str, Any] = {
      'name': name,
      'criterion': criterion,
      'num_examples': test.num_examples,
      'num_classes': test.num_classes,
      'num_exits': test.num_exits,
      'per_exit': [{'exit': e, 'accuracy': float(per_exit_acc[e]),
                    'macs': float(test.exit_macs[e])} for e in range(test.num_exits)],
      'sweep': early_exit.threshold_sweep(*args, criterion=criterion, num_points=num_points),
      'oracle': early_exit.oracle(*args),
      'baseline': None,
      'calibrated': [],
  }

  ref_macs = float(test.exit_macs[-1])
  ref_label = "the last exit's MACs"
  if baseline is not None:
    baseline = _as_logits(baseline)
    b_acc, b_macs = _single_exit(baseline)
    target = b_acc - ACCURACY_TOLERANCE
    reaching = [p['mean_macs'] for p in report['sweep'] if p['accuracy'] >= target]
    at_target = min(reaching) if reaching else None
    for p in report['sweep']:
      p['relative_macs'] = p['mean_macs'] / b_macs if b_macs else None
    report['baseline'] = {
        'accuracy': b_acc, 'macs': b_macs,
        'target_accuracy': target,
        'macs_at_target': at_target,
        'relative_macs_at_target': (at_target / b_macs if at_target is not None and b_macs
                                    else None),
    }
    ref_macs, ref_label = b_macs, "the baseline's MACs"

  if val is not None:
    val = _as_logits(val)
    _check_same_model(test, val, 'val and test logits come from different models')
    targets: list[tuple[str, dict[str, float]]] = []
    if baseline_val is not None:
      baseline_val = _as_logits(baseline_val)
      bv_acc, _ = _single_exit(baseline_val)
      report['baseline'] = report['baseline'] or {}
      report['baseline']['val_accuracy'] = bv_acc
      targets.append(('val accuracy >= baseline val accuracy - 0.5 pts',
                      {'min_accuracy': bv_acc - ACCURACY_TOLERANCE}))
    last_val_acc = float(early_exit.per_exit_accuracy(val.exit_logits, val.labels)[-1])
    targets.append(('val accuracy >= last-exit val accuracy - 0.5 pts',
                    {'min_accuracy': last_val_acc - ACCURACY_TOLERANCE}))
    for f in budgets or ():
      targets.append((f'mean MACs <= {100 * f:g}% of {ref_label}',
                      {'max_mean_macs': f * ref_macs}))
    for label, constraint in targets:
      report['calibrated'].append(
          _calibrated_point(label, constraint, val, test, criterion,
                            report['baseline']['macs'] if baseline is not None else None))
  return _jsonable(report)


def _calibrated_point(label: str, constraint: dict[str, float], val: ExitLogits,
                      test: ExitLogits, criterion: str,
                      baseline_macs: float | None) -> dict[str, Any]:
  point: dict[str, Any] = {'target': label, 'constraint': constraint}
  try:
    # Only validation logits reach calibrate; test is used to evaluate after.
    t = early_exit.calibrate(val.exit_logits, val.labels, val.exit_macs,
                             criterion=criterion, **constraint)
  except ValueError as e:
    point['error'] = str(e)
    return point
  on_val = early_exit.evaluate_policy(val.exit_logits, val.labels, t, val.exit_macs, criterion)
  on_test = early_exit.evaluate_policy(test.exit_logits, test.labels, t, test.exit_macs,
                                       criterion)
  point.update({
      'thresholds': t,
      'val_accuracy': on_val['accuracy'],
      'val_mean_macs': on_val['mean_macs'],
      'test_accuracy': on_test['accuracy'],
      'test_mean_macs': on_test['mean_macs'],
      'test_exit_fractions': on_test['exit_fractions'],
      'relative_macs': (on_test['mean_macs'] / baseline_macs if baseline_macs else None),
  })
  return point


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


def _pct(x: float | None, digits: int = 2) -> str:
  return '—' if x is None else f'{100 * x:.{digits}f}'


def _mmacs(x: float | None) -> str:
  return '—' if x is None else f'{x / 1e6:.2f}'


def _fractions(fr: Sequence[float] | None) -> str:
  return '—' if fr is None else ' / '.join(f'{f:.2f}' for f in fr)


def _thresholds(t: Sequence[float] | None) -> str:
  if t is None or len(t) == 0:
    return '—'
  if all(v == t[0] for v in t):  # shared threshold: show it once
    return f'{t[0]:.4g}'
  return ', '.join(f'{v:.4g}' for v in t)


def _model_markdown(name: str, r: Mapping[str, Any]) -> list[str]:
  base = r.get('baseline') or {}
  b_macs = base.get('macs')
  lines = [f'## {name}', '',
           f"criterion: `{r.get('criterion')}`, {r.get('num_examples')} test examples, "
           f"{r.get('num_classes')} classes", '',
           '### Per-exit accuracy', '',
           '| exit | accuracy (%) | cumulative MMACs |', '|---:|---:|---:|']
  for p in r['per_exit']:
    lines.append(f"| {p['exit']} | {_pct(p['accuracy'])} | {_mmacs(p['macs'])} |")
  lines.append('')
  if base.get('accuracy') is not None:
    line = (f"**Baseline:** {_pct(base['accuracy'])} % at {_mmacs(b_macs)} MMACs")
    if 'val_accuracy' in base:
      line += f" (val {_pct(base['val_accuracy'])} %)"
    at = base.get('macs_at_target')
    line += (f"; the test curve reaches {_pct(base['target_accuracy'])} % "
             f"(baseline - 0.5 pts) at "
             + (f"{_mmacs(at)} MMACs ({_pct(base['relative_macs_at_target'], 1)} % of "
                'baseline MACs)' if at is not None else 'no point of the sweep'))
    lines += [line, '']
  o = r['oracle']
  lines += [f"**Oracle** (first correct exit): {_pct(o['accuracy'])} % at "
            f"{_mmacs(o['mean_macs'])} MMACs, exit fractions {_fractions(o['exit_fractions'])}",
            '', '### Threshold sweep (test)', '',
            '| threshold | accuracy (%) | mean MMACs | % of baseline MACs | exit fractions |',
            '|---:|---:|---:|---:|:---|']
  for p in r['sweep']:
    rel = p.get('relative_macs')
    lines.append(f"| {_thresholds(p['thresholds'])} | {_pct(p['accuracy'])} | "
                 f"{_mmacs(p['mean_macs'])} | {_pct(rel, 1)} | "
                 f"{_fractions(p['exit_fractions'])} |")
  lines.append('')
  if r.get('calibrated'):
    lines += ['### Calibrated on val, evaluated on test', '',
              '| target | thresholds | val acc (%) | val MMACs | test acc (%) | test MMACs '
              '| % of baseline MACs | exit fractions |',
              '|:---|---:|---:|---:|---:|---:|---:|:---|']
    for c in r['calibrated']:
      if 'error' in c:
        lines.append(f"| {c['target']} | infeasible: {c['error']} | | | | | | |")
        continue
      lines.append(f"| {c['target']} | {_thresholds(c['thresholds'])} | "
                   f"{_pct(c['val_accuracy'])} | {_mmacs(c['val_mean_macs'])} | "
                   f"{_pct(c['test_accuracy'])} | {_mmacs(c['test_mean_macs'])} | "
                   f"{_pct(c.get('relative_macs'), 1)} | "
                   f"{_fractions(c['test_exit_fractions'])} |")
    lines.append('')
  return lines


def report_markdown(reports: Mapping[str, Mapping[str, Any]],
                    title: str = 'Early-exit report') -> str:
  """Markdown text of several model reports."""
  lines = [f'# {title}', '',
           'Accuracy in %, compute in mean MMACs (1e6 multiply-accumulates) per image.', '']
  for name, r in reports.items():
    lines += _model_markdown(name, r)
  return '\n'.join(lines)


def plot_accuracy_vs_macs(path: str | os.PathLike, reports: Mapping[str, Mapping[str, Any]],
                          title: str = 'Early-exit report') -> str:
  """PNG with one sweep curve per model, per-exit points, oracle and baseline(s)."""
  # Figure + Agg canvas directly: no pyplot global state, no display needed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  fig = Figure(figsize=(9.5, 5.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  colors = [f'C{i % 10}' for i in range(len(reports))]
  baselines: list[tuple[float, float]] = []
  for color, (name, r) in zip(colors, reports.items()):
    sweep = sorted(r['sweep'], key=lambda p: p['mean_macs'])
    ax.plot([p['mean_macs'] / 1e6 for p in sweep], [100 * p['accuracy'] for p in sweep],
            '-', color=color, lw=1.5, label=f'{name} (threshold sweep)')
    ax.plot([p['macs'] / 1e6 for p in r['per_exit']],
            [100 * p['accuracy'] for p in r['per_exit']],
            's', color=color, ms=6, mfc='none', label=f'{name} exits alone')
    o = r['oracle']
    ax.plot([o['mean_macs'] / 1e6], [100 * o['accuracy']], '*', color=color, ms=13,
            mec='k', mew=0.5, label=f'{name} oracle')
    cal = [c for c in r.get('calibrated') or () if 'error' not in c]
    if cal:
      ax.plot([c['test_mean_macs'] / 1e6 for c in cal],
              [100 * c['test_accuracy'] for c in cal],
              'X', color=color, ms=8, mec='k', mew=0.5, label=f'{name} calibrated on val')
    base = r.get('baseline') or {}
    if base.get('accuracy') is not None:
      key = (base['macs'], base['accuracy'])
      if not any(np.isclose(key, b).all() for b in baselines):
        baselines.append(key)
  for i, (m, a) in enumerate(baselines):
    ax.plot([m / 1e6], [100 * a], 'D', color='k', ms=8,
            label='baseline' if i == 0 else None)
  ax.set_xlabel('mean MMACs per image')
  ax.set_ylabel('test accuracy (%)')
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  # Outside the axes: several models' markers would otherwise hide data.
  ax.legend(fontsize='small', loc='upper left', bbox_to_anchor=(1.02, 1.0))
  return atomic.save_figure(path, fig, dpi=120, bbox_inches='tight')


def write_report(out_dir: str | os.PathLike, reports: Mapping[str, Mapping[str, Any]],
                 title: str = 'Early-exit report') -> dict[str, str]:
  """Write report.json, report.md and accuracy_vs_macs.png; returns their paths.

  ``reports`` maps a model name to an `early_exit_report` dict.
  """
  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  reports = {str(k): _jsonable(v) for k, v in reports.items()}
  paths = {'json': os.path.join(out_dir, REPORT_JSON),
           'markdown': os.path.join(out_dir, REPORT_MD),
           'plot': os.path.join(out_dir, REPORT_PNG)}
  atomic.write_json(paths['json'], {'title': title, 'reports': reports}, indent=2,
                    allow_nan=False)
  atomic.write_text(paths['markdown'], report_markdown(reports, title))
  plot_accuracy_vs_macs(paths['plot'], reports, title)
  return paths


__all__ = [
    'ExitLogits', 'save_logits', 'load_logits', 'early_exit_report', 'report_markdown',
    'plot_accuracy_vs_macs', 'write_report',
]


def _load_run(run_dir: str | os.PathLike, split: str) -> ExitLogits | None:
  path = os.path.join(run_dir, f'{split}_logits.npz')
  if not os.path.exists(path):
    if split == 'val':
      return None
    raise FileNotFoundError(f'{path} is missing; write it with python -m launch.evaluate '
                            f'--config ... --workdir {run_dir}')
  return load_logits(path)


def report_runs(out_dir: str | os.PathLike, runs: Mapping[str, str | os.PathLike], *,
                baseline: str | os.PathLike | None = None,
                budgets: Sequence[float] = (0.55, 0.7),
                title: str = 'Early-exit report') -> dict[str, Any]:
  """Report over run directories holding `{val,test}_logits.npz`.

  Writes the report files plus copies of every npz used (`<name>_<split>_logits.npz`,
  `baseline_<split>_logits.npz`) into `out_dir`, so the folder is self-contained.
  """
  os.makedirs(out_dir, exist_ok=True)
  base_test = _load_run(baseline, 'test') if baseline else None
  base_val = _load_run(baseline, 'val') if baseline else None
  reports = {}
  for name, run_dir in runs.items():
    reports[name] = early_exit_report(
        _load_run(run_dir, 'test'), val=_load_run(run_dir, 'val'), baseline=base_test,
        baseline_val=base_val, budgets=list(budgets), name=name)
  sources = dict(runs, **({'baseline': baseline} if baseline else {}))
  for name, run_dir in sources.items():
    for split in ('val', 'test'):
      src = os.path.join(run_dir, f'{split}_logits.npz')
      if os.path.exists(src):
        atomic.copy_file(src, os.path.join(out_dir, f'{name}_{split}_logits.npz'))
  write_report(out_dir, reports, title=title)
  return reports
