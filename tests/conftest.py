"""Test setup: 8 fake CPU devices (for sharding tests), no network, temp caches."""

import os

# Must happen before jax initialises its backend.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TFDS_DISABLE_NETWORK", "1")

import jax  # noqa: E402

jax.config.update("jax_threefry_partitionable", True)
