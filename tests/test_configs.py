"""Every config builds, its model matches its data, and bad arguments are named."""

import importlib
import pathlib

import pytest

from adaptive_vision import models
from adaptive_vision.train import loop

CONFIGS = sorted(p.stem for p in (pathlib.Path(__file__).parents[1] / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common", "benchmarks"))  # benchmarks: targets


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("arg", [None, "runlocal"])
def test_config_builds_and_validates(name, arg, tmp_path):
  module = importlib.import_module(f"configs.{name}")
  assert module.__doc__ and "python -m launch.train" in module.__doc__
  c = module.get_config(arg)
  macs = models.exit_macs(c.model)
  assert all(m > 0 for m in macs) and macs == sorted(macs)
  if c.get("teacher"):
    models.exit_macs(c.teacher.model)
  if c.loss.name in ("kd", "erde"):
    assert c.teacher is not None
  loop.validate_config(c, str(tmp_path / "w"))
  if arg == "runlocal":
    assert c.data.source == "synthetic"


def test_unknown_config_argument_is_named():
  from configs import vit_cifar10
  with pytest.raises(ValueError, match="unknown config argument 'epohcs'"):
    vit_cifar10.get_config("epohcs=3")



def test_unknown_loss_name_is_refused_before_anything_runs(tmp_path):
  from configs import erde_cifar10
  with pytest.raises(ValueError, match=r"unknown loss.name='kdd'; valid names: \('ce', 'kd', 'erde'\)"):
    loop.validate_config(erde_cifar10.get_config("loss=kdd"), str(tmp_path / "w"))
  assert not (tmp_path / "w").exists()

def test_ravit_and_baseline_share_the_recipe():
  from configs import ravit_cifar10, vit_cifar10
  r, v = ravit_cifar10.get_config(), vit_cifar10.get_config()
  assert r.optim.to_dict() == v.optim.to_dict()
  assert (r.num_epochs, r.batch_size, r.data.augment) == (v.num_epochs, v.batch_size, v.data.augment)
  last = dict(r.model.branches[-1])
  assert last["variant"] == v.model.variant and last["resolution"] == v.model.image_size


def _keys(d, prefix=""):
  out = set()
  for k, v in d.items():
    out |= _keys(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
  return out


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_starts_from_the_base_config(name):
  """base_config() is the one home of defaults: every config holds all its keys
  (model and teacher are each config's own)."""
  from configs import common
  base = {k for k in _keys(common.base_config().to_dict()) if k != "teacher"}
  c = importlib.import_module(f"configs.{name}").get_config(None)
  assert base <= _keys(c.to_dict())


def test_base_config_defaults_agree():
  """One value per default: the ERDE entropy weight is on (so loss.name=erde keeps
  the term) and the erde configs keep it; eval covers val and test."""
  from configs import common, erde_cifar10
  base = common.base_config()
  assert base.loss.entropy_weight == 0.5 and base.data.source == "folder"
  assert tuple(base.eval_splits) == ("val", "test")
  assert erde_cifar10.get_config("loss=erde").loss.entropy_weight == 0.5
