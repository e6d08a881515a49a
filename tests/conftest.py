"""Test setup: 8 faked CPU devices (as on a small pod slice) before JAX initializes."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
