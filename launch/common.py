"""What every launcher does at start: logging, JAX flags, clear errors."""

from __future__ import annotations

import logging
import sys

from absl import app


def setup(distributed: bool = False) -> None:
  import jax
  if distributed:
    jax.distributed.initialize()
  jax.config.update("jax_threefry_partitionable", True)
  logging.getLogger("absl").setLevel(logging.WARNING)


def fail(message: str, code: int = 2):
  print(f"error: {message}", file=sys.stderr)
  sys.exit(code)


def run(main):
  """absl.app.run, with config-flag errors (unknown keys, wrong types) shown as one line."""
  try:
    app.run(main)
  except (KeyError, TypeError, AttributeError, ValueError) as e:
    # ml_collections raises these while parsing --config.* overrides.
    fail(f"{e} (check --config.* overrides against the config file's fields)")
