"""Test setup: 8 host CPU devices before JAX starts, so mesh tests run on one CPU."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
  """Run the test with float64 enabled (parity tests against NumPy references)."""
  with jax.enable_x64(True):
    yield
