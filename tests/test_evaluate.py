"""launch.evaluate recomputes the logits of a checkpoint; launch.report writes the report."""

import os
import subprocess
import sys

import numpy as np

from adaptive_vision.eval import logits as logits_lib
from adaptive_vision.train import loop
from test_train import tiny_config  # tests/ is on sys.path under pytest
import pytest

# Subprocesses and whole runs: `pytest -m 'not slow'` skips them (CI runs all).
pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_evaluate_recomputes_logits_and_report_writes_files(tmp_path):
  workdir = str(tmp_path / "run")
  loop.train_and_evaluate(tiny_config(total_steps=4), workdir)
  saved = logits_lib.load_logits(os.path.join(workdir, "test_logits.npz"))
  os.remove(os.path.join(workdir, "test_logits.npz"))

  from launch import evaluate
  evaluate.compute_logits(tiny_config(total_steps=4), workdir)
  again = logits_lib.load_logits(os.path.join(workdir, "test_logits.npz"))
  np.testing.assert_allclose(again.exit_logits, saved.exit_logits, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(again.labels, saved.labels)

  out = str(tmp_path / "report")
  proc = subprocess.run(
      [sys.executable, "-m", "launch.report", f"--run=tiny={workdir}", f"--baseline={workdir}",
       f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  for name in ("report.json", "report.md", "accuracy_vs_macs.png", "tiny_test_logits.npz",
               "baseline_val_logits.npz"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name


def test_readme_commands_on_a_fresh_clone(tmp_path):
  """The README's commands as a newcomer runs them: evaluate before training
  (an error that says how to train), then train into runs/x where runs/ does
  not exist yet, then evaluate; no spurious TPU or Orbax lines on the way."""
  config = "configs/vit_cifar10.py:runlocal"
  tiny = ["--config.total_steps=4", "--config.batch_size=16", "--config.eval_batch_size=64",
          "--config.log_every=2", "--config.checkpoint_every=4",
          "--config.data.synthetic_train_size=256", "--config.data.synthetic_test_size=64",
          "--config.data.val_size=64", "--config.data.image_size=16",
          "--config.model.image_size=16", "--config.model.width=32", "--config.model.depth=1",
          "--config.model.mlp_dim=64"]
  workdir = os.path.join(str(tmp_path), "runs", "x")
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}

  def launch(name):
    return subprocess.run([sys.executable, "-m", f"launch.{name}", f"--config={config}",
                           f"--workdir={workdir}", *tiny], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)

  early = launch("evaluate")
  assert early.returncode == 2, early.stderr[-2000:]
  assert ("train it first with `python -m launch.train --config "
          f"{config} --workdir {workdir}`") in early.stderr
  assert "teacher" not in early.stderr
  assert not os.path.exists(os.path.join(str(tmp_path), "runs"))  # evaluate creates nothing

  for name in ("train", "evaluate"):
    proc = launch(name)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"launch.{name}: {output[-2000:]}"
    assert "Unable to initialize backend" not in output, f"launch.{name}: {output[-2000:]}"
    assert "could not be restored" not in output, f"launch.{name}: {output[-2000:]}"
  for split in ("val", "test"):
    assert logits_lib.load_logits(os.path.join(workdir, f"{split}_logits.npz")).labels.shape == (64,)


def test_launch_scripts_import_side_by_side_and_keep_their_flags():
  # Both define --config: importing one for its functions beside the other
  # (as tests on one pytest worker do) must not define flags twice.
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  both = subprocess.run([sys.executable, "-c", "from launch import export, evaluate"],
                        cwd=root, capture_output=True, text=True)
  assert both.returncode == 0, both.stderr[-2000:]
  for script, flag in (("launch.evaluate", "reuse_logits"), ("launch.export", "baseline_config")):
    helped = subprocess.run([sys.executable, "-m", script, "--helpfull"], cwd=root,
                            capture_output=True, text=True)
    assert flag in helped.stdout + helped.stderr, (script, helped.stderr[-2000:])
