"""Evaluation: from trained parameters to logits files, reports and plots.

  predict.py   per-exit logits of a model on a data split (jitted, sharded)
  logits.py    the logits file contract (`<split>_logits.npz`), read and written
  report.py    the early-exit report of one model (pure maths: arrays -> dict)
  compare.py   two models' accuracy/compute curves, the teacher-budget point (pure)
  summary.py   a training run's summary from its workdir
  markdown.py  Markdown of reports, comparisons and summaries (pure: dict -> str)
  plots.py     accuracy-vs-MACs plots
  files.py     the file edge: writes reports, comparisons and summaries atomically

`python -m launch.report` is the one launcher over files.py.
"""

from adaptive_vision.eval.logits import ExitLogits, as_logits, load_logits, save_logits

__all__ = ["ExitLogits", "as_logits", "load_logits", "save_logits"]
