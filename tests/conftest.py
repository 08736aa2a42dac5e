"""Test set-up shared by every test file.

Eight host devices are requested before JAX starts, so the data-parallel tests see a mesh of 8; every
other test runs on the first device as usual.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402

# Start the backend now, with jaxlib's default CPU library: a command run in-process (the benchmarks'
# `run_cli`, `python -m train`'s main) then cannot switch this worker to Eigen halfway through the suite
# (`flaxnets.cpu.prefer_eigen` leaves a started backend alone). tests/test_cpu.py covers both libraries.
jax.devices()
