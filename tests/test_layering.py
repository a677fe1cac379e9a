"""The import directions of docs/design.md ("Layering"), checked on the source:
every import of an adaptive_vision module (at module level or inside a
function) goes to a unit its unit may use, so no arrow points back up."""

import ast
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent

# unit -> the units it may import (besides itself). Units are the top-level
# modules and packages of adaptive_vision. Keep in step with docs/design.md.
ALLOWED = {
    "config": set(), "flops": set(), "machine": set(), "atomic": set(), "exits": set(),
    "cache_dir": set(),
    "workdir_lock": {"atomic", "config"},
    "models": {"flops", "exits"},
    "cpu": {"models", "cache_dir"},
    "backend": {"models", "cpu"},
    "data": {"config", "cache_dir"},
    "sharding": {"config"},
    "losses": {"config", "exits"},
    "early_exit": {"exits"},
    "inference": {"backend", "early_exit", "exits"},
    "eval": {"atomic", "backend", "config", "data", "early_exit", "exits", "machine",
             "models", "sharding"},
    "export": {"data", "early_exit", "eval", "models"},
    "classify": {"backend", "config", "data", "inference", "models"},
    "train": {"atomic", "backend", "config", "data", "eval", "export", "losses", "machine",
              "models", "sharding", "exits", "workdir_lock"},
}


def _unit(module: str) -> str:
  return module.split(".")[1] if module.count(".") else ""


def _imports(path: pathlib.Path, package: str):
  tree = ast.parse(path.read_text(), str(path))
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module:
      if node.level:  # relative: resolve against the package
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        yield ".".join(base + [node.module]), node.lineno
      else:
        yield node.module, node.lineno
        for alias in node.names:  # `from adaptive_vision import models`
          yield f"{node.module}.{alias.name}", node.lineno
    elif isinstance(node, ast.Import):
      for alias in node.names:
        yield alias.name, node.lineno


def _violations():
  bad = []
  for path in sorted((ROOT / "adaptive_vision").rglob("*.py")):
    rel = path.relative_to(ROOT).with_suffix("")
    module = ".".join(rel.parts)
    unit = _unit(module)
    if unit in ("", "__init__"):
      continue
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for target, line in _imports(path, package):
      if not target.startswith("adaptive_vision."):
        continue
      other = _unit(target)
      if other == unit or other not in ALLOWED:
        continue  # within the unit, or not a unit (e.g. `from adaptive_vision import x`)
      if other not in ALLOWED[unit]:
        bad.append(f"{rel}.py:{line}: {unit} imports {target} ({other} is not below {unit})")
  return bad


def test_every_unit_is_listed():
  units = {p.stem if p.is_file() else p.name for p in (ROOT / "adaptive_vision").iterdir()
           if (p.suffix == ".py" and p.stem != "__init__") or (p / "__init__.py").exists()}
  assert units == set(ALLOWED), sorted(units ^ set(ALLOWED))


def test_imports_follow_the_layering():
  assert _violations() == []


def test_nothing_imports_the_launchers_or_the_benchmarks():
  bad = []
  for folder in ("adaptive_vision", "benchmarks", "configs", "tests"):
    for path in (ROOT / folder).rglob("*.py"):
      for target, line in _imports(path, folder):
        if target.split(".")[0] == "launch" and folder != "tests":
          bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target}")
        if (target.split(".")[0] == "benchmarks" and folder != "benchmarks"
            and path.name != "test_benchmarks.py"):
          bad.append(f"{path.relative_to(ROOT)}:{line}: imports {target}")
        if folder == "configs" and target.startswith("adaptive_vision"):
          bad.append(f"{path.relative_to(ROOT)}:{line}: a config imports {target}")
  assert bad == []


def test_the_cpu_backend_is_imported_only_when_chosen():
  """Importing the library (models, training, inference, evaluation) loads no
  CPU module: only backend.choose / prepare_process import it, on CPU."""
  code = ("import sys; import adaptive_vision.train.build, adaptive_vision.train.loop, "
          "adaptive_vision.inference, adaptive_vision.classify, adaptive_vision.export, "
          "adaptive_vision.models.resnet, adaptive_vision.models.ravit; "
          "print(sorted(m for m in sys.modules if m.startswith('adaptive_vision.cpu')))")
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert out.stdout.strip() == "[]"
