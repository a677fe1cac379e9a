"""One cache root for everything the library can rebuild."""

import pathlib

from adaptive_vision.cache_dir import cache_dir
from adaptive_vision.cpu import compiler
from adaptive_vision.cpu.native import build
from adaptive_vision.data import sources
from configs import common


def test_every_cache_lives_under_one_root(monkeypatch, tmp_path):
  monkeypatch.setenv("ADAPTIVE_VISION_CACHE", str(tmp_path))
  data = common.base_config().data
  data.cache_dir = None
  assert cache_dir() == tmp_path
  assert sources.cache_root(data) == tmp_path
  assert build.cache_dir() == tmp_path / "native"
  assert compiler._cache_file().parent == tmp_path / "compiler"  # pylint: disable=protected-access
  data.cache_dir = str(tmp_path / "elsewhere")  # the config's choice wins for the data
  assert sources.cache_root(data) == tmp_path / "elsewhere"


def test_default_root_is_in_the_users_cache(monkeypatch):
  monkeypatch.delenv("ADAPTIVE_VISION_CACHE", raising=False)
  assert cache_dir("native") == pathlib.Path.home() / ".cache" / "adaptive_vision" / "native"
