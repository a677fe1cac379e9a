"""Test setup: 8 fake CPU devices (for sharding tests), no network, temp caches."""

import os

# Must happen before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TFDS_DISABLE_NETWORK", "1")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
# XLA:CPU compiles threefry's unrolled hash very slowly (a jitted ResNet-8 init:
# ~80 s with threefry, ~15 s with rbg on a loaded 2-core machine); the
# launchers make the same choice (launch/common.py).
jax.config.update("jax_default_prng_impl", "rbg")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: subprocess, whole-run, reliability and benchmark tests "
      "(deselect with -m 'not slow'; CI and the README's command run them)")
