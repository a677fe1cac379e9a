"""Reading configs without second defaults.

Every config key has its default in one place, `configs/common.py`
`base_config()`. Library code reads keys with `require`, which fails with one
line naming the missing key instead of falling back to a default of its own.
"""

from __future__ import annotations

from typing import Any


class MissingConfigKey(ValueError):
  """A config lacks a key the library reads (a ValueError: launchers print one line)."""


def require(cfg: Any, key: str, where: str | None = None) -> Any:
  """`cfg[key]`, None included; `where` is the path of `cfg` in the whole
  config (e.g. 'data'; None for the top level).

  Raises MissingConfigKey naming `where.key` when `cfg` lacks the key.
  """
  name = f"{where}.{key}" if where else key
  try:
    present = key in cfg
  except TypeError:  # an object with attributes, not a mapping
    present = hasattr(cfg, key)
    if present:
      return getattr(cfg, key)
  if not present:
    raise MissingConfigKey(
        f"config key {name} is missing; configs start from "
        f"configs.common.base_config(), which sets every key (add {name} "
        "to a config built by hand)")
  return cfg[key]


__all__ = ["MissingConfigKey", "require"]
