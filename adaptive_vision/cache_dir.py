"""Where the library keeps what it can rebuild (decoded datasets, the native
kernels, compiler probes, the tests' compiled programs): $ADAPTIVE_VISION_CACHE,
else ~/.cache/adaptive_vision. Deleting it costs time, never results."""

import os
import pathlib

ENV = "ADAPTIVE_VISION_CACHE"
DEFAULT = "~/.cache/adaptive_vision"


def cache_dir(*parts: str) -> pathlib.Path:
  """The cache root (not created), or `parts` joined under it."""
  return pathlib.Path(os.environ.get(ENV) or DEFAULT).expanduser().joinpath(*parts)
