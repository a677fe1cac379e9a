"""The experiment scripts: every config argument they use builds, and a
results README that promises the script's commands line for line has them."""

import importlib
import itertools
import pathlib
import re
import shlex

import pytest

ROOT = pathlib.Path(__file__).parents[1]
SCRIPTS = sorted((ROOT / "launch" / "experiments").glob("*.sh"))


def commands(text: str, variables: dict[str, str] | None = None) -> list[str]:
  """The `python -m ...` commands of a shell text, continuation lines joined,
  whitespace collapsed, `$NAME` variables substituted."""
  joined = re.sub(r"\\\n\s*", " ", text)
  out = []
  for line in joined.splitlines():
    line = " ".join(line.split())
    if line.startswith("python -m "):
      for name, value in (variables or {}).items():
        line = re.sub(rf"\${name}\b", value, line)
      out.append(line)
  return out


def assignments(text: str) -> dict[str, str]:
  return dict(re.findall(r"^([A-Z_]+)=(\S+)$", text, flags=re.M))


def config_args(script: pathlib.Path) -> set[tuple[str, str]]:
  """(config module, argument) of every --config in the script, each command
  expanded over the values of the `for NAME in ...; do` loops around it."""
  text = script.read_text()
  variables = assignments(text)
  loops: dict[str, list[str]] = {}
  found = set()
  for line in re.sub(r"\\\n\s*", " ", text).splitlines():
    loop = re.match(r"\s*for (\w+) in (.+?); do", line)
    if loop:
      loops[loop.group(1)] = shlex.split(loop.group(2))
    for cmd in commands(line, variables):
      for module, arg in re.findall(r"--config[ =]\"?(configs/\w+\.py)(?::([^\s\"]*))?", cmd):
        names = [n for n in loops if f"${n}" in arg or f"${{{n}" in arg]
        for values in itertools.product(*(loops[n] for n in names)):
          a = arg
          for n, v in zip(names, values):
            a = a.replace(f"${{{n}:+,${n}}}", f",{v}" if v else "")
            a = re.sub(rf"\$\{{?{n}\}}?", v, a)
          found.add((module, a))
  return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_config_argument_of_the_script_builds(script, tmp_path):
  """A typo in an argument would otherwise surface hours into the study."""
  from adaptive_vision.train import loop
  specs = config_args(script)
  assert specs, f"{script.name} has no --config"
  for module, arg in sorted(specs):
    assert "$" not in arg, (script.name, arg)
    config = importlib.import_module(f"configs.{pathlib.Path(module).stem}").get_config(arg or None)
    loop.validate_config(config, str(tmp_path / "w"))
    epochs = re.search(r"epochs=(\d+)", arg)
    if epochs:
      assert config.num_epochs == int(epochs.group(1)), (module, arg)
    teacher = re.search(r"teacher_dir=([^,]+)", arg)
    if teacher and config.teacher is not None:  # cross-entropy students have none
      assert config.teacher.checkpoint == teacher.group(1), (module, arg)


@pytest.mark.parametrize("script, study", [("erde_cifar10_cpu", "erde_cifar10_cpu"),
                                           ("erde_cifar10_resnet56", "erde_cifar10_resnet56_cpu")])
def test_erde_results_readme_has_the_script_line_for_line(script, study):
  text = (ROOT / "launch" / "experiments" / f"{script}.sh").read_text()
  readme = (ROOT / "results" / study / "README.md").read_text()
  want = commands(text, assignments(text))
  assert len(want) >= 7
  assert commands(readme) == want


def _study_metric():
  path = ROOT / "results" / "ravit_cifar10_cpu" / "study" / "study_metric.py"
  spec = importlib.util.spec_from_file_location("study_metric", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_ravit_study_metric_uses_the_baseline_vits_macs_and_its_rules(tmp_path):
  """The RAViT study's selection script: its ViT MACs are the config's, and
  --choose / --exit_rule follow PLAN.md on hand-made validation logits."""
  import numpy as np
  from adaptive_vision import models
  from adaptive_vision.eval import logits as logits_lib
  from configs import vit_cifar10
  sm = _study_metric()
  assert sm.BASELINE_MACS == models.exit_macs(vit_cifar10.get_config().model)[-1]
  rng = np.random.default_rng(0)
  n, labels = 400, rng.integers(0, 10, 400)
  macs = [0.25 * sm.BASELINE_MACS, sm.BASELINE_MACS]

  def run(name, right_first, right_last):
    """Exit 0 right on the first `right_first` images, the last exit on the first `right_last`."""
    logits = rng.normal(0, 0.1, (2, n, 10)).astype(np.float32)
    for k, right in enumerate((right_first, right_last)):
      logits[k, np.arange(n), (labels + (np.arange(n) >= right)) % 10] += 4.0
    folder = tmp_path / name
    folder.mkdir()
    logits_lib.save_logits(folder / "val_logits.npz", logits, labels, macs)
    return str(folder)

  weak, strong = run("weak", 200, 300), run("strong", 200, 360)
  assert sm.metric(strong)["val_exit_accuracy"] == [50.0, 90.0]
  assert sm.choose([sm.metric(weak), sm.metric(strong)]) == strong
  # --exit_rule on logits where the two rules disagree: exit 0 is right, with a
  # runner-up class (low entropy, top probability 0.66), on the first half, and
  # wrong with a flat rest (higher entropy, top probability 0.69) on the other;
  # the last exit is right everywhere. At <= 0.72x (at most 63% reach the last
  # exit) entropy lets the right half leave early (100%), while the top
  # probability can only let the wrong half, or everyone, leave (50% either way).
  logits = np.zeros((2, n, 10), np.float32)
  half = np.arange(n) < n // 2
  logits[0, np.arange(n), np.where(half, labels, (labels + 1) % 10)] = np.where(half, 4.0, 3.0)
  logits[0, np.arange(n), (labels + 2) % 10] += np.where(half, 3.0, 0.0)
  logits[1, np.arange(n), labels] = 8.0
  folder = tmp_path / "disagree"
  folder.mkdir()
  logits_lib.save_logits(folder / "val_logits.npz", logits, labels, macs)
  rule, means = sm.exit_rule([str(folder)])
  assert rule == "entropy"
  assert means["entropy"] == 100.0
  assert means["max_prob"] == 50.0
  rule, means = sm.exit_rule([weak, strong])
  assert set(means) == {"entropy", "max_prob"}
  assert rule == ("max_prob" if means["max_prob"] > means["entropy"] else "entropy")
