"""Tests of adaptive_vision.eval: logits files, reports, Markdown, plot and the launcher."""
import json
import math
import os

import matplotlib.image
import numpy as np
import pytest

from adaptive_vision import early_exit
from adaptive_vision.eval import files, logits as logits_lib, report as report_lib

LN3 = math.log(3.0)
LABELS = np.array([0, 0, 1, 1])
EXIT0 = np.array([[20.0, 0.0], [LN3, 0.0], [0.0, 0.0], [20.0, 0.0]], np.float32)
EXIT1 = np.array([[0.0, 20.0], [20.0, 0.0], [0.0, 20.0], [0.0, 20.0]], np.float32)
MACS = [1e6, 3e6]


def two_exit(exit0=EXIT0):
  return logits_lib.ExitLogits(np.stack([exit0, EXIT1]), LABELS, MACS)


def baseline():
  # Single exit, 75 % accurate, 3 MMACs.
  return logits_lib.ExitLogits(EXIT1[None], LABELS, [3e6])


def test_roundtrip(tmp_path):
  path = logits_lib.save_logits(tmp_path / "sub" / "test_logits.npz", [EXIT0, EXIT1],
                               LABELS.astype(np.int32), MACS)
  assert os.path.basename(path) == "test_logits.npz"
  with np.load(path) as z:
    assert z["exit_logits"].dtype == np.float32 and z["exit_logits"].shape == (2, 4, 2)
    assert np.issubdtype(z["labels"].dtype, np.integer)
  got = logits_lib.load_logits(path)
  np.testing.assert_array_equal(got.exit_logits, np.stack([EXIT0, EXIT1]))
  np.testing.assert_array_equal(got.labels, LABELS)
  np.testing.assert_array_equal(got.exit_macs, MACS)
  assert (got.num_exits, got.num_examples, got.num_classes) == (2, 4, 2)


def test_load_validation(tmp_path):
  bad = tmp_path / "bad.npz"
  np.savez(bad, exit_logits=np.zeros((2, 4, 3), np.float32), labels=np.zeros(5, int),
           exit_macs=np.ones(2))
  with pytest.raises(ValueError, match=r"bad\.npz.*labels has shape \(5,\)"):
    logits_lib.load_logits(bad)
  missing = tmp_path / "missing.npz"
  np.savez(missing, exit_logits=np.zeros((2, 4, 3), np.float32), labels=np.zeros(4, int))
  with pytest.raises(ValueError, match="lacks \\['exit_macs'\\]"):
    logits_lib.load_logits(missing)
  with pytest.raises(ValueError, match="exit_macs has 3 entries for 2 exits"):
    logits_lib.ExitLogits(np.zeros((2, 4, 3)), np.zeros(4, int), [1, 2, 3])
  with pytest.raises(ValueError, match="non-decreasing"):
    logits_lib.ExitLogits(np.zeros((2, 4, 3)), np.zeros(4, int), [2, 1])


def test_report_by_hand():
  r = report_lib.early_exit_report(two_exit(), baseline=baseline(), name="ee")
  json.dumps(r, allow_nan=False)  # strict JSON
  assert [p["accuracy"] for p in r["per_exit"]] == [0.5, 0.75]
  assert [p["macs"] for p in r["per_exit"]] == MACS
  sweep = r["sweep"]
  assert (sweep[0]["accuracy"], sweep[0]["mean_macs"]) == pytest.approx((0.5, 1e6))
  assert (sweep[-1]["accuracy"], sweep[-1]["mean_macs"]) == pytest.approx((0.75, 3e6))
  assert sweep[-1]["relative_macs"] == pytest.approx(1.0)
  o = r["oracle"]
  assert (o["accuracy"], o["mean_macs"]) == pytest.approx((1.0, 2e6))
  assert o["exit_fractions"] == pytest.approx([0.5, 0.5])
  b = r["baseline"]
  assert (b["accuracy"], b["macs"]) == pytest.approx((0.75, 3e6))
  # Cheapest sweep point with accuracy >= 74.5 %: ex0, ex1, ex3 exit early -> 1.5 MMACs.
  assert b["macs_at_target"] == pytest.approx(1.5e6)
  assert b["relative_macs_at_target"] == pytest.approx(0.5)
  assert r["calibrated"] == []


def test_report_never_reaching_baseline():
  perfect = np.array([[20.0, 0.0], [20.0, 0.0], [0.0, 20.0], [0.0, 20.0]], np.float32)
  strong = logits_lib.ExitLogits(perfect[None], LABELS, [5e6])  # 100 %: curve tops at 75 %
  r = report_lib.early_exit_report(two_exit(), baseline=strong)
  assert r["baseline"]["accuracy"] == 1.0
  assert r["baseline"]["macs_at_target"] is None


def test_calibrated_points_use_val_only(monkeypatch):
  # On test, ex1's exit 0 is wrong, so test-tuned thresholds would differ.
  test0 = EXIT0.copy()
  test0[1] = [0.0, LN3]
  test, val = two_exit(test0), two_exit()
  seen = []
  real = early_exit.calibrate

  def spy(logits, labels, macs, **kw):
    seen.append(np.array(logits))
    return real(logits, labels, macs, **kw)

  monkeypatch.setattr(early_exit, "calibrate", spy)
  r = report_lib.early_exit_report(test, val=val, baseline=baseline(), baseline_val=baseline(),
                                  budgets=[0.8, 0.1])
  assert seen and all(np.array_equal(x, val.exit_logits) for x in seen)
  cal = {c["target"]: c for c in r["calibrated"]}
  acc_pt = cal["val accuracy >= baseline val accuracy - 0.5 pts"]
  # On val: min MACs with acc >= 74.5 % exits ex0, ex1, ex3 (1.5 MMACs).
  assert acc_pt["val_mean_macs"] == pytest.approx(1.5e6)
  expected = early_exit.evaluate_policy(test.exit_logits, LABELS, acc_pt["thresholds"], MACS)
  assert acc_pt["test_accuracy"] == pytest.approx(expected["accuracy"]) == pytest.approx(0.5)
  assert acc_pt["test_mean_macs"] == pytest.approx(1.5e6)
  budget = cal["mean MACs <= 80% of the baseline's MACs"]
  assert budget["val_mean_macs"] <= 0.8 * 3e6
  assert "lowest achievable" in cal["mean MACs <= 10% of the baseline's MACs"]["error"]
  assert "val accuracy >= last-exit val accuracy - 0.5 pts" in cal
  json.dumps(r, allow_nan=False)


def test_write_report(tmp_path):
  rng = np.random.default_rng(0)
  n, k = 120, 5
  labels = rng.integers(0, k, n)
  reports = {}
  for name, boost in (("ce", 1.0), ("erde", 1.5)):
    logits = rng.normal(size=(3, n, k)).astype(np.float32)
    for e in range(3):
      logits[e, np.arange(n), labels] += boost * (e + 1) * rng.random(n)
    data = logits_lib.ExitLogits(logits, labels, [2e6, 5e6, 9e6])
    base = logits_lib.ExitLogits(logits[-1:], labels, [9e6])
    reports[name] = report_lib.early_exit_report(data, val=data, baseline=base,
                                                budgets=[0.5], num_points=12, name=name)
  paths = files.write_report(tmp_path / "out", reports, title="students")
  assert sorted(os.listdir(tmp_path / "out")) == ["accuracy_vs_macs.png", "report.json",
                                                  "report.md"]
  with open(paths["json"]) as f:
    loaded = json.load(f)
  assert loaded["title"] == "students" and set(loaded["reports"]) == {"ce", "erde"}
  md = open(paths["markdown"]).read()
  assert "| threshold | accuracy (%) | mean MMACs | % of baseline MACs | exit fractions |" in md
  assert "| exit | accuracy (%) | cumulative MMACs |" in md
  assert "## ce" in md and "## erde" in md and "**Oracle**" in md and "**Baseline:**" in md
  assert os.path.getsize(paths["plot"]) > 1000
  img = matplotlib.image.imread(paths["plot"])
  assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def _run_dir(path, logits, labels, macs):
  for split in ("val", "test"):
    logits_lib.save_logits(path / f"{split}_logits.npz", logits, labels, macs)
  return str(path)


def test_compare_runs_writes_both_comparisons_and_the_teacher_point(tmp_path):
  rng = np.random.default_rng(1)
  n, k = 200, 4
  labels = rng.integers(0, k, n)
  dirs = {}
  for name, boost in (("a", 2.0), ("b", 1.0), ("teacher", 4.0)):
    logits = rng.normal(size=(2, n, k)).astype(np.float32)
    logits[:, np.arange(n), labels] += boost
    dirs[name] = _run_dir(tmp_path / name, logits, labels,
                          [1e6, 2e6] if name != "teacher" else [4e6, 8e6])
  out = str(tmp_path / "cmp" / "a_vs_b")
  result = files.compare_runs(out, ("a", dirs["a"]), ("b", dirs["b"]), teacher=dirs["teacher"],
                              budget=0.25, gap_points=1.0)
  saved = json.load(open(out + ".json"))
  assert saved["a"] == "a" and saved["same_thresholds"]["points"] == 20
  assert saved["matched_macs"]["mean_difference"] > 0  # A is the more accurate model
  tt = result["teacher_target"]
  assert tt["budget_macs"] == 0.25 * 8e6 and tt["target_points"] == 1.0
  md = open(out + ".md").read()
  assert "# a vs b (test split)" in md and "## Against the teacher" in md
  assert ("met" if tt["met"] else "missed") + ")." in md


def test_summarize_run_reads_config_and_metrics(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "config.json").write_text(json.dumps(
      {"model": {"name": "vit"}, "num_epochs": 2, "batch_size": 8}))
  records = [{"step": 0, "kind": "info", "params": 10, "exit_macs": [5e6], "total_steps": 4},
             {"step": 2, "kind": "train", "loss": 2.0, "images_per_sec": 100.0},
             {"step": 4, "kind": "train", "loss": 1.5, "images_per_sec": 120.0},
             {"step": 4, "kind": "eval", "split": "test", "accuracy": 0.5,
              "accuracy/exit0": 0.5},
             {"step": 4, "kind": "final", "train_seconds": 60.0, "start_step": 0}]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  s = files.summarize_run(str(workdir), str(tmp_path / "out" / "run"), command="cmd")
  assert s["median_train_images_per_sec"] == 110.0 and s["test"] == {
      "accuracy": 0.5, "accuracy/exit0": 0.5}
  # 2 steps of 8 at 100 images/s, then 2 at 120.
  assert s["train_seconds_from_throughput"] == pytest.approx(16 / 100 + 16 / 120)
  md = open(tmp_path / "out" / "run.md").read()
  assert "Command: `cmd`" in md and "| test accuracy | 50.00% |" in md
  assert "| training wall time | 1.0 min |" in md
  assert "Summarized on: " in md and "did not record its machines" in md

  # Runs record their machine at every process start; a restart on the same
  # machine is not listed again, another machine is, with its first step.
  a, b = "CPU A (family 25, AVX-512), 2 cores", "CPU B (family 26, AVX2), 2 cores"
  with_machines = records + [{"step": s, "kind": "machine", "machine": m, "device_kind": "cpu"}
                             for s, m in ((0, a), (2, a), (3, b))]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in with_machines))
  s = files.summarize_run(str(workdir), str(tmp_path / "out" / "run"), command="cmd")
  assert [m["from_step"] for m in s["trained_on"]] == [0, 3]
  md = open(tmp_path / "out" / "run.md").read()
  assert f"Trained on: {a} from step 0; {b} from step 3" in md

  # A resumed run: the finishing process's clock is not the run's training time.
  records[0:3] = [records[0], {"step": 2, "kind": "train", "loss": 2.0, "images_per_sec": 0.4},
                  {"step": 4, "kind": "train", "loss": 1.5, "images_per_sec": 0.8}]
  records[-1] = {"step": 4, "kind": "final", "train_seconds": 60.0, "start_step": 2}
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  files.summarize_run(str(workdir), str(tmp_path / "out" / "run"), command="cmd")
  md = open(tmp_path / "out" / "run.md").read()
  assert "training wall time" not in md
  assert ("| training time | 1.0 min from the logged images/s, every segment; "
          "the last process 1.0 min (from step 2) |") in md


def test_machine_names_the_widest_vector_extension():
  from adaptive_vision import machine
  assert machine.vector_extension({"avx", "avx2", "avx512f"}) == "AVX-512"
  assert machine.vector_extension({"avx", "avx2", "fma"}) == "AVX2"
  assert machine.vector_extension({"avx512f", "amx_tile"}) == "AMX"
  assert machine.vector_extension({"neon"}) is None
  line = machine.describe()
  assert f"{os.cpu_count()} cores" in line and machine.cpu_model() in line


@pytest.mark.slow
def test_report_launcher_wants_exactly_one_mode(tmp_path):
  import subprocess
  import sys
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  proc = subprocess.run([sys.executable, "-m", "launch.report", "--run", "x=y",
                         "--summarize", "z", "--out", str(tmp_path / "o")],
                        cwd=root, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: give --out and exactly one of: --run name=workdir (a report), --a/--b "
      "name=workdir (a comparison), --summarize workdir; got --run and --summarize")
  assert not os.path.exists(tmp_path / "o")


def _student(rng, labels, k, strength, macs=(1e6, 2e6, 3e6)):
  logits = rng.normal(size=(3, len(labels), k)).astype(np.float32)
  for e in range(3):
    logits[e, np.arange(len(labels)), labels] += strength * (e + 1)
  return logits


def test_seed_study_means_paired_differences_and_claims(tmp_path):
  from adaptive_vision.eval import seeds
  rng = np.random.default_rng(2)
  n, k = 300, 5
  labels = rng.integers(0, k, n)
  teacher = tmp_path / "teacher"
  _run_dir(teacher, _student(rng, labels, k, 3.0), labels, [4e6, 8e6, 12e6])
  for method, strength in (("kd", 0.6), ("erde", 0.9)):
    for s in (0, 1, 2):
      _run_dir(tmp_path / f"{method}_s{s}", _student(rng, labels, k, strength + 0.05 * s),
               labels, [1e6, 2e6, 3e6])
  out = tmp_path / "study"
  study = files.seed_report(str(out), {m: str(tmp_path / f"{m}_s{{seed}}") for m in ("kd", "erde")},
                            [0, 1, 2], str(teacher), reference="erde", teacher_budget=0.25,
                            gap_points=1.0, budgets=[0.05, 0.1, 0.2, 0.3], title="toy")
  # Hand check of one cell: the mean and sample std over seeds of the final exit.
  finals = []
  for s in (0, 1, 2):
    test = logits_lib.load_logits(tmp_path / f"erde_s{s}" / "test_logits.npz")
    finals.append(np.mean(test.exit_logits[-1].argmax(-1) == labels))
  cell = study["per_exit"]["erde"][-1]["accuracy"]
  assert cell["mean"] == pytest.approx(np.mean(finals))
  assert cell["std"] == pytest.approx(np.std(finals, ddof=1))
  # Paired differences are seed by seed, at every shared threshold and budget.
  d = study["paired"]["erde-kd"]["shared_thresholds"][5]["difference"]["values"]
  a = study["shared_thresholds"]["erde"][5]["accuracy"]["values"]
  b = study["shared_thresholds"]["kd"][5]["accuracy"]["values"]
  np.testing.assert_allclose(d, np.subtract(a, b))
  assert len(study["paired"]["erde-kd"]["budgets"]) == 4
  # 5% of the teacher (0.6 MMACs) is below both students' cheapest exit (1 MMAC):
  # no method reaches it, so it is listed and left out of the claims.
  assert study["claims"]["budgets_unreachable"] == [0.05]
  assert study["claims"]["erde >= kd everywhere"]["budgets_points"] == 3
  # ERDE is the stronger student here at every point: the claims say so.
  assert study["claims"]["erde >= kd everywhere"]["met"]
  assert study["claims"]["erde better than kd on average"]["met"]
  assert study["final_beats_middle"]["erde"] == [True, True, True]
  (tc,) = study["claims"]["teacher"]
  assert tc["budget_fraction"] == 0.25 and tc["seed"] in (0, 1, 2)
  assert tc["met"] == (tc["gap_points"] <= 1.0)
  # "Better on average" needs the 95% interval of the per-seed averaged
  # difference above zero; budgets that give the same policy count once.
  avg = study["paired"]["erde-kd"]["average_shared_thresholds"]
  assert avg["above_zero"] and avg["ci"][0] > 0
  per_seed = np.subtract(study["shared_thresholds"]["erde"][0]["accuracy"]["values"],
                         study["shared_thresholds"]["kd"][0]["accuracy"]["values"])
  assert len(avg["values"]) == 3 and per_seed.shape == (3,)
  rows = study["budgets"]["erde"]
  for j in range(1, len(rows)):
    same = rows[j - 1]["thresholds"] == rows[j]["thresholds"]
    if same and rows[j]["thresholds"][0] is not None:
      assert rows[j].get("same_policy_as") is not None
  assert sorted(os.listdir(out)) == sorted(
      ["seeds_report.json", "seeds_report.md", "seeds_accuracy_vs_macs.png",
       "seeds_paired_differences.png"]
      + [f"{m}_s{s}_{split}_logits.npz" for m in ("kd", "erde") for s in (0, 1, 2)
         for split in ("val", "test")] + ["teacher_val_logits.npz", "teacher_test_logits.npz"])
  md = open(out / "seeds_report.md").read()
  assert "**erde >= kd everywhere**" in md and " ± " in md and "seed bands" in md
  assert "(the 5% budget, below every method's cheapest exit, left out)" in md
  # A budget that another method reaches and the reference does not is a miss.
  import dataclasses
  pairs = {m: [tuple(logits_lib.load_logits(tmp_path / f"{m}_s{s}" / f"{split}_logits.npz")
                     for split in ("val", "test")) for s in (0, 1, 2)] for m in ("kd", "erde")}
  pairs["cheap_kd"] = [tuple(dataclasses.replace(x, exit_macs=x.exit_macs / 2) for x in pair)
                       for pair in pairs.pop("kd")]
  other = seeds.seed_study(pairs, logits_lib.load_logits(teacher / "test_logits.npz"),
                           reference="erde", teacher_budget=0.25, gap_points=1.0,
                           budgets=[0.05, 0.1, 0.2, 0.3])
  assert other["claims"]["budgets_unreachable"] == []
  assert not other["claims"]["erde >= cheap_kd everywhere"]["met"]
  with pytest.raises(ValueError, match="same number"):
    seeds.seed_study({"a": [], "b": []}, logits_lib.load_logits(teacher / "test_logits.npz"),
                     reference="a", teacher_budget=0.25, gap_points=1.0)
  # One seed has no spread: its report shows values, never "± 0.00".
  from adaptive_vision.eval import markdown
  one = seeds.seed_study({m: pairs_[:1] for m, pairs_ in pairs.items()},
                         logits_lib.load_logits(teacher / "test_logits.npz"), seeds=[0],
                         reference="erde", teacher_budget=0.25, gap_points=1.0,
                         budgets=[0.2, 0.3])
  md = markdown.seeds_markdown(one, "one seed")
  assert " ± " not in md and "One seed (0) per method, so no spread" in md
  assert "seed bands" not in md
