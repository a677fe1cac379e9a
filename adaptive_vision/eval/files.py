"""The file edge of evaluation: reports, comparisons and run summaries written
to disk. Every file is written atomically (adaptive_vision.atomic): a kill at
any moment leaves the previous file or the new one."""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from adaptive_vision import atomic
from adaptive_vision.eval import compare as compare_lib
from adaptive_vision.eval import markdown, plots, summary
from adaptive_vision.eval import seeds as seeds_lib
from adaptive_vision.eval.logits import ExitLogits, load_logits
from adaptive_vision.eval.report import early_exit_report, jsonable

REPORT_JSON = "report.json"
REPORT_MD = "report.md"
REPORT_PNG = "accuracy_vs_macs.png"


def write_report(out_dir: str | os.PathLike, reports: Mapping[str, Mapping[str, Any]],
                 title: str = "Early-exit report") -> dict[str, str]:
  """Writes report.json, report.md and accuracy_vs_macs.png; returns their paths.

  `reports` maps a model name to an `early_exit_report` dict.
  """
  out_dir = os.fspath(out_dir)
  reports = {str(k): jsonable(v) for k, v in reports.items()}
  paths = {"json": os.path.join(out_dir, REPORT_JSON),
           "markdown": os.path.join(out_dir, REPORT_MD),
           "plot": os.path.join(out_dir, REPORT_PNG)}
  atomic.write_json(paths["json"], {"title": title, "reports": reports}, indent=2,
                    allow_nan=False)
  atomic.write_text(paths["markdown"], markdown.report_markdown(reports, title))
  plots.plot_accuracy_vs_macs(paths["plot"], reports, title)
  return paths


def load_run(run_dir: str | os.PathLike, split: str) -> ExitLogits | None:
  """`<split>_logits.npz` of a run; None for a missing val file (no calibration)."""
  path = os.path.join(run_dir, f"{split}_logits.npz")
  if not os.path.exists(path):
    if split == "val":
      return None
    raise FileNotFoundError(f"{path} is missing; write it with python -m launch.evaluate "
                            f"--config ... --workdir {run_dir}")
  return load_logits(path)


def report_runs(out_dir: str | os.PathLike, runs: Mapping[str, str | os.PathLike], *,
                baseline: str | os.PathLike | None = None,
                budgets: Sequence[float] = (0.55, 0.7),
                title: str = "Early-exit report") -> dict[str, Any]:
  """Report over run directories holding `{val,test}_logits.npz`.

  Writes the report files plus copies of every npz used (`<name>_<split>_logits.npz`,
  `baseline_<split>_logits.npz`) into `out_dir`, so the folder is self-contained.
  """
  base_test = load_run(baseline, "test") if baseline else None
  base_val = load_run(baseline, "val") if baseline else None
  reports = {}
  for name, run_dir in runs.items():
    reports[name] = early_exit_report(
        load_run(run_dir, "test"), val=load_run(run_dir, "val"), baseline=base_test,
        baseline_val=base_val, budgets=list(budgets), name=name)
  sources = dict(runs, **({"baseline": baseline} if baseline else {}))
  for name, run_dir in sources.items():
    for split in ("val", "test"):
      src = os.path.join(run_dir, f"{split}_logits.npz")
      if os.path.exists(src):
        atomic.copy_file(src, os.path.join(out_dir, f"{name}_{split}_logits.npz"))
  write_report(out_dir, reports, title=title)
  return reports


def compare_runs(out: str, a: tuple[str, str], b: tuple[str, str], *,
                 teacher: str | None = None, budget: float | None = None,
                 gap_points: float | None = None) -> dict[str, Any]:
  """Model A against model B on test (`<out>.json`, `<out>.md`); with a teacher,
  A's accuracy within `budget` of the teacher's final-exit MACs, calibrated on
  A's validation logits, and whether it is within `gap_points` of the teacher's."""
  (na, da), (nb, db) = a, b
  test_a, test_b = load_run(da, "test"), load_run(db, "test")
  result = {"a": na, "b": nb, **compare_lib.compare(test_a, test_b)}
  if teacher:
    if budget is None or gap_points is None:
      raise ValueError("a comparison with a teacher needs its budget and gap_points")
    val_a = load_run(da, "val")
    if val_a is None:
      raise FileNotFoundError(f"{da}/val_logits.npz is missing: the budget point is "
                              "calibrated on validation; write it with python -m launch.evaluate")
    result["teacher_target"] = compare_lib.teacher_budget_point(
        val_a, test_a, load_run(teacher, "test"), budget, gap_points)
    result["budget"] = budget
  atomic.write_json(out + ".json", jsonable(result), indent=1)
  atomic.write_text(out + ".md", markdown.compare_markdown(result))
  return result


def summarize_run(workdir: str, out: str, *, command: str = "", note: str = "") -> dict:
  """`<out>.json` and `<out>.md`: a training run's summary (summary.summarize)."""
  s = dict(summary.summarize(workdir), command=command)
  atomic.write_json(out + ".json", s, indent=1)
  atomic.write_text(out + ".md", markdown.summary_markdown(s, command, note))
  return s


SEEDS_JSON, SEEDS_MD, SEEDS_PNG = "seeds_report.json", "seeds_report.md", "seeds_accuracy_vs_macs.png"
CLAIMS_JSON, CLAIMS_MD, CLAIMS_PNG = "claim_table.json", "claim_table.md", "claim_table.png"


def cascade_seed_report(out_dir: str, name: str, pattern: str, baseline_pattern: str,
                        seeds: Sequence[int], *, budgets: Sequence[float],
                        claims: Sequence[tuple[float, float, str]] = (),
                        title: str = "Cascade vs baseline over seeds",
                        criterion: str = "entropy") -> dict[str, Any]:
  """The claim table (`cascade_seeds.claim_table`) of run folders `pattern` and
  `baseline_pattern` with a `{seed}` placeholder: writes claim_table.{json,md,png}
  and copies of the npz files (`<name>_s<seed>_<split>_logits.npz`,
  `baseline_s<seed>_<split>_logits.npz`) into `out_dir`."""
  from adaptive_vision.eval import cascade_seeds
  loaded = {}
  for who, pat in ((name, pattern), ("baseline", baseline_pattern)):
    if "{seed}" not in pat:
      raise ValueError(f"{pat}: the folder needs a {{seed}} placeholder, e.g. runs/{who}_s{{seed}}")
    loaded[who] = []
    for seed in seeds:
      run_dir = pat.format(seed=seed)
      val, test = load_run(run_dir, "val"), load_run(run_dir, "test")
      if val is None or test is None:
        raise FileNotFoundError(f"{run_dir} lacks val_logits.npz or test_logits.npz; write "
                                "them with python -m launch.evaluate")
      loaded[who].append((val, test))
      for split in ("val", "test"):
        copy = os.path.join(out_dir, f"{who}_s{seed}_{split}_logits.npz")
        src = os.path.join(run_dir, f"{split}_logits.npz")
        if os.path.abspath(src) != os.path.abspath(copy):
          os.makedirs(out_dir, exist_ok=True)
          atomic.copy_file(src, copy)
  table = cascade_seeds.claim_table(loaded[name], loaded["baseline"], seeds, budgets=budgets,
                                    claims=claims, criterion=criterion)
  os.makedirs(out_dir, exist_ok=True)
  atomic.write_json(os.path.join(out_dir, CLAIMS_JSON), jsonable(table), indent=1)
  atomic.write_text(os.path.join(out_dir, CLAIMS_MD), cascade_seeds.markdown(table, title))
  plots.plot_claim_table(os.path.join(out_dir, CLAIMS_PNG), table, title)
  return table
SEEDS_DIFF_PNG = "seeds_paired_differences.png"


def seed_report(out_dir: str, runs: Mapping[str, str], seeds: Sequence[int], teacher: str, *,
                reference: str, teacher_budget: float | Sequence[float], gap_points: float,
                budgets: Sequence[float] = seeds_lib.DEFAULT_BUDGETS,
                title: str = "Methods over seeds") -> dict[str, Any]:
  """The seed study of run folders `runs[method]`, a pattern with `{seed}`
  (e.g. runs/erde_kd_s{seed}), each holding {val,test}_logits.npz.

  Writes seeds_report.{json,md}, seeds_accuracy_vs_macs.png,
  seeds_paired_differences.png (with two or more methods) and copies of
  every npz used (`<method>_s<seed>_<split>_logits.npz`,
  `teacher_<split>_logits.npz`), so `out_dir` is self-contained.
  """
  pairs, sources = {}, {}
  for method, pattern in runs.items():
    if "{seed}" not in pattern:
      raise ValueError(f"--run {method}={pattern}: the folder needs a {{seed}} placeholder, "
                       f"e.g. {method}=runs/erde_{method}_s{{seed}}")
    pairs[method] = []
    for s in seeds:
      run_dir = pattern.format(seed=s)
      val = load_run(run_dir, "val")
      if val is None:
        raise FileNotFoundError(f"{run_dir}/val_logits.npz is missing: the budgets are "
                                "calibrated on validation; write it with python -m launch.evaluate")
      pairs[method].append((val, load_run(run_dir, "test")))
      sources[f"{method}_s{s}"] = run_dir
  study = seeds_lib.seed_study(pairs, load_run(teacher, "test"), seeds=seeds,
                               reference=reference, teacher_budget=teacher_budget,
                               gap_points=gap_points, budgets=budgets)
  for name, run_dir in dict(sources, teacher=teacher).items():
    for split in ("val", "test"):
      src = os.path.join(run_dir, f"{split}_logits.npz")
      if os.path.exists(src):
        atomic.copy_file(src, os.path.join(out_dir, f"{name}_{split}_logits.npz"))
  study = jsonable(study)
  atomic.write_json(os.path.join(out_dir, SEEDS_JSON), dict(study, title=title), indent=1,
                    allow_nan=False)
  atomic.write_text(os.path.join(out_dir, SEEDS_MD), markdown.seeds_markdown(study, title))
  plots.plot_seed_study(os.path.join(out_dir, SEEDS_PNG), study, title)
  if study["paired"]:
    plots.plot_paired_differences(os.path.join(out_dir, SEEDS_DIFF_PNG), study, title)
  return study
